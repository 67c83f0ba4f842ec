"""aiobatch: a pure-asyncio driver for OpenAI-compatible Batch APIs.

The public surface is this package plus :mod:`aiobatch.errors`,
:mod:`aiobatch.transport` and :mod:`aiobatch.testing`; every other module is private
and re-exported here.
"""

from __future__ import annotations

from ._batched import BATCHED_ENDPOINTS, BatchedOpenAI, BatchedResult, BatchedStats
from ._budget import RequestBudget
from ._client import BatchClient
from ._clock import Clock, SystemClock
from ._convert import STATUS_ALIASES
from ._create import CREATE_KEY_METADATA
from ._fleet import (
    BatchDone,
    DeadlinePassed,
    DoneReason,
    Fleet,
    FleetConfig,
    FleetEvent,
    FleetStats,
    ProgressChanged,
    StatusChanged,
    TrackingError,
)
from ._lifecycle import (
    ACTIVE,
    MEANINGS,
    REACHABLE,
    TERMINAL,
    TRANSITIONS,
    BatchLifecycle,
    BatchStatus,
    Transition,
)
from ._models import (
    Batch,
    BatchError,
    BatchErrors,
    BatchPage,
    BatchRequest,
    BatchUsage,
    ErrorBody,
    File,
    FileDeleted,
    FilePage,
    InputTokensDetails,
    LineError,
    LineResponse,
    OutputTokensDetails,
    RequestCounts,
    ResultError,
    ResultHTTPError,
    ResultLine,
    ResultSuccess,
)
from ._provider import (
    AZURE_API_VERSION_V1,
    AZURE_LIMITS,
    DEFAULT_BASE_URL,
    OPENAI_LIMITS,
    PORTKEY_BASE_URL,
    PROVIDER_NAMES,
    AnthropicProvider,
    AzureOpenAIProvider,
    CompatibleProvider,
    GeminiProvider,
    GroqProvider,
    Limits,
    OpenAIProvider,
    PortkeyProvider,
    Provider,
    Quirks,
    Secret,
    provider_from_env,
)
from ._results import decode_result_line, read_results
from ._retry import RetryPolicy, is_retry_testing, set_retry_testing
from ._run import (
    BatchCreated,
    BatchEnded,
    BatchEvent,
    BatchRun,
    Price,
    ProgressDisplay,
    RunConfig,
    RunProgress,
    RunReport,
    RunResult,
    Worker,
    format_report,
    read_report,
    request_cancel,
)

__all__ = [
    "ACTIVE",
    "AZURE_API_VERSION_V1",
    "AZURE_LIMITS",
    "AnthropicProvider",
    "AzureOpenAIProvider",
    "BATCHED_ENDPOINTS",
    "Batch",
    "BatchClient",
    "BatchCreated",
    "BatchDone",
    "BatchEnded",
    "BatchError",
    "BatchErrors",
    "BatchEvent",
    "BatchLifecycle",
    "BatchPage",
    "BatchRequest",
    "BatchRun",
    "BatchStatus",
    "BatchUsage",
    "BatchedOpenAI",
    "BatchedResult",
    "BatchedStats",
    "CREATE_KEY_METADATA",
    "Clock",
    "CompatibleProvider",
    "DEFAULT_BASE_URL",
    "DeadlinePassed",
    "DoneReason",
    "ErrorBody",
    "File",
    "FileDeleted",
    "FilePage",
    "Fleet",
    "FleetConfig",
    "FleetEvent",
    "FleetStats",
    "GeminiProvider",
    "GroqProvider",
    "InputTokensDetails",
    "Limits",
    "LineError",
    "LineResponse",
    "MEANINGS",
    "OPENAI_LIMITS",
    "OpenAIProvider",
    "OutputTokensDetails",
    "PORTKEY_BASE_URL",
    "PROVIDER_NAMES",
    "PortkeyProvider",
    "Price",
    "ProgressChanged",
    "ProgressDisplay",
    "Provider",
    "Quirks",
    "REACHABLE",
    "RequestBudget",
    "RequestCounts",
    "ResultError",
    "ResultHTTPError",
    "ResultLine",
    "ResultSuccess",
    "RetryPolicy",
    "RunConfig",
    "RunProgress",
    "RunReport",
    "RunResult",
    "STATUS_ALIASES",
    "Secret",
    "StatusChanged",
    "SystemClock",
    "TERMINAL",
    "TRANSITIONS",
    "TrackingError",
    "Transition",
    "Worker",
    "decode_result_line",
    "format_report",
    "is_retry_testing",
    "provider_from_env",
    "read_report",
    "read_results",
    "request_cancel",
    "set_retry_testing",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("aiobatch")
        except PackageNotFoundError:  # running from a source tree that is not installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
