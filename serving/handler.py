"""TorchServe handler for ClipCap: four thin stages over `clipcap.serving`, where all request logic lives.

Custom metrics (declared in serving/metrics.yaml, so the prometheus endpoint shows them):
ClipcapBatchSize (histogram), ClipcapBatches (counter of batches by BatchSizeUpTo, the power-of-two
bucket TorchServe's histogram cannot be given), ClipcapTokensGenerated (counter) and
Clipcap{Preprocess,Encode,Decode}Seconds (histograms of per-batch stage time).
"""
import os
import sys

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from clipcap.serving import PART_NAMES, BatchStats, CaptionService, ServingConfigError, batch_size_bucket


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
        self.initialized = True

    def preprocess(self, data):
        headers = [self.context.get_all_request_header(index) for index in range(len(data))]
        ids = [self.context.get_request_id(index) for index in range(len(data))]
        return self.service.parse_batch(data, headers, ids)

    def inference(self, requests):
        replies, stats = self.service.caption_batch(requests)
        self._record(stats)
        return replies

    def postprocess(self, replies):
        for index, reply in enumerate(replies):
            self.context.set_response_status(reply.status, reply.phrase, idx=index)
            self.context.set_response_content_type(index, "application/json")
        return [reply.body for reply in replies]

    def _record(self, stats: BatchStats) -> None:
        metrics = self.context.metrics
        metrics.add_metric("ClipcapBatchSize", stats.batch_size, "count", metric_type=MetricTypes.HISTOGRAM)
        metrics.add_counter("ClipcapBatches", 1, dimensions=[  # in metrics.yaml's dimension order
            Dimension("ModelName", metrics.model_name), Dimension("Level", "Model"),
            Dimension("BatchSizeUpTo", str(batch_size_bucket(stats.batch_size)))])
        if stats.captioned:
            metrics.add_counter("ClipcapTokensGenerated", stats.tokens)
            for stage, milliseconds in stats.timings_ms.items():
                metrics.add_time(f"Clipcap{stage.capitalize()}Seconds", milliseconds / 1e3, unit="s",
                                 metric_type=MetricTypes.HISTOGRAM)
