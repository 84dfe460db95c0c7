"""Engine layer: the front end's handle on `EngineCore`, whatever process it lives in.

`InprocClient` runs the core in the caller's process (tests and the offline
`LLM`). A client that runs the core in its own process plugs in behind the
same four methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.config import PagodaConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.messages import EngineCoreOutputs, EngineCoreRequest


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """Outputs of the next engine step."""

    @abstractmethod
    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; False while some block is still in use."""

    @abstractmethod
    def shutdown(self) -> None: ...


class InprocClient(EngineCoreClient):
    """`get_output` runs one `EngineCore.step()` in this process."""

    def __init__(self, config: PagodaConfig) -> None:
        self.engine_core = EngineCore(config)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
