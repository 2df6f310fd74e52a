"""Serving: one typed request (`engine.CaptionRequest`), one scheduler per worker (`engine.CaptionEngine`),
the request rules every front shares (`service.CaptionService`, its settings `config.ServingConfig`), and
the fronts' wire formats: TorchServe's inference API (`front`, `rows`), KServe v2 (`oip`), OpenAI's chat
completions (`openai_chat`), Ray Serve (`ray_serve`) and the limits its HTTP proxy applies (`http_limits`).

Nothing is imported here: Ray Serve's proxy imports `http_limits` without loading torch.
"""
