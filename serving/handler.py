"""TorchServe handler for ClipCap: TorchServe's rows in (as clipcap.serving.form Forms), the worker's CaptionEngine
(clipcap.serving.engine) does the rest.

TorchServe's batches (the shipped model-config.yaml) join the engine together and are answered when the
last is done; with `asyncCommunication: true` TorchServe hands every request to the worker as it arrives
and the handler awaits each one's caption, so requests join the running decode step by step.
All request logic lives in clipcap.serving.

Custom metrics (declared in serving/metrics.yaml, so the prometheus endpoint shows them):
ClipcapBatchSize (histogram: per handler call, the most rows its requests shared a decode step with),
ClipcapBatches (counter of handler calls by BatchSizeUpTo, the power-of-two bucket of that row count, which
TorchServe's histogram cannot be given), ClipcapTokensGenerated (counter) and
Clipcap{Preprocess,Encode,Decode}Seconds (histograms of stage time, summed over the call's requests).
"""
import asyncio
import os
import sys

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from clipcap.serving.form import PART_NAMES, from_torchserve
from clipcap.serving.service import BatchStats, CaptionService, ServingConfigError, batch_size_bucket


def _recording_part_names(retrieve):
    """TorchServe folds a request's parts into one dict, a repeated name keeping its last part; this
    records every name under PART_NAMES in the request's headers, so the service can refuse repeats."""
    def retrieve_data_for_inference(batch):
        headers, rows, ids = retrieve(batch)
        for processor, request in zip(headers, batch):
            processor.get_request_properties()[PART_NAMES] = [p["name"] for p in request["parameters"]]
        return headers, rows, ids

    return staticmethod(retrieve_data_for_inference)


# Worker-wide, once when TorchServe imports this file. The worker hands JSON bodies on as bytes (it reads
# this variable per request): clipcap.serving parses them itself, refusing repeated keys and deep nesting.
os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
Service.retrieve_data_for_inference = _recording_part_names(Service.retrieve_data_for_inference)


class ClipCapHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        try:
            self.service = CaptionService.from_archive(properties["model_dir"], context.model_yaml_config,
                                                       properties.get("gpu_id"))
        except ServingConfigError as error:  # on stderr: model_log.log has it at WARN (stdout lines are INFO)
            print(f"ERROR clipcap cannot start: {error}", file=sys.stderr, flush=True)
            raise
        self.asynchronous = bool(context.model_yaml_config.get("asyncCommunication"))
        self.initialized = True

    def handle(self, data, context):
        """A list of answers (TorchServe's batches), or with asyncCommunication the coroutine TorchServe awaits."""
        if self.asynchronous:
            return self._handle_async(data, context)
        return super().handle(data, context)

    async def _handle_async(self, data, context):
        # `context` is this request's own copy: never self.context, which another request's call may hold.
        requests = await asyncio.to_thread(self._parse, data, context)
        replies = await asyncio.gather(*(self.service.caption(request) for request in requests))
        return self._answer(replies, context)

    def preprocess(self, data):
        return self._parse(data, self.context)

    def inference(self, requests):
        replies, stats = self.service.caption_batch(requests)
        self._record(self.context, stats)
        return replies

    def postprocess(self, replies):
        return self._answer(replies, self.context, recorded=True)

    def _parse(self, data, context):
        forms = [from_torchserve(row, context.get_all_request_header(index)) for index, row in enumerate(data)]
        return self.service.parse_batch(forms, [context.get_request_id(index) for index in range(len(data))])

    def _answer(self, replies, context, recorded: bool = False):
        for index, reply in enumerate(replies):
            context.set_response_status(reply.status, reply.phrase, idx=index)
            context.set_response_content_type(index, "application/json")
            for name, value in reply.headers.items():
                context.set_response_header(index, name, value)
        if not recorded:
            self._record(context, BatchStats.of(replies))
        return [reply.body for reply in replies]

    def _record(self, context, stats: BatchStats) -> None:
        metrics = context.metrics
        if stats.rows:  # once per handler call: the most rows its requests shared a decode step with
            metrics.add_metric("ClipcapBatchSize", max(stats.rows), "count", metric_type=MetricTypes.HISTOGRAM)
            metrics.add_counter("ClipcapBatches", 1, dimensions=[  # in metrics.yaml's dimension order
                Dimension("ModelName", metrics.model_name), Dimension("Level", "Model"),
                Dimension("BatchSizeUpTo", str(batch_size_bucket(max(stats.rows))))])
        if stats.captioned:
            metrics.add_counter("ClipcapTokensGenerated", stats.tokens)
            for stage, milliseconds in stats.timings_ms.items():
                metrics.add_time(f"Clipcap{stage.capitalize()}Seconds", milliseconds / 1e3, unit="s",
                                 metric_type=MetricTypes.HISTOGRAM)
