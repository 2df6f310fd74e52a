"""Independent re-statements of the paper's decoding (rmokady/CLIP_prefix_caption `generate2` and
`generate_beam`): one image, no KV cache, straight on `model.gpt`. Tests compare the library to these.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def paper_greedy(model, prefix_embeds: torch.Tensor, stop_ids: list[int], max_tokens: int) -> list[int]:
    generated = prefix_embeds[None]  # (1, P, E)
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = model.gpt(inputs_embeds=generated).logits[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        if token in stop_ids:
            break
        next_embed = model.gpt.transformer.wte(torch.tensor([[token]]))
        generated = torch.cat((generated, next_embed), dim=1)
    return tokens


@torch.no_grad()
def paper_beam(model, prefix_embeds: torch.Tensor, stop_ids: list[int], max_tokens: int, beam_size: int = 5,
               temperature: float = 1.0) -> list[int]:
    generated = prefix_embeds[None]
    tokens = None
    scores = None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    for _ in range(max_tokens):
        logits = model.gpt(inputs_embeds=generated).logits[:, -1, :] / temperature
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            average = scores_sum / seq_lengths[:, None]
            average, next_tokens = average.view(-1).topk(beam_size, -1)
            source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
            is_stopped = is_stopped[source]
        next_embed = model.gpt.transformer.wte(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_embed), dim=1)
        is_stopped = is_stopped | torch.isin(next_tokens.squeeze(1), torch.tensor(stop_ids))
        if is_stopped.all():
            break
    order = (scores / seq_lengths).argsort(descending=True)
    best = order[0]
    return tokens[best, : int(seq_lengths[best])].tolist()
