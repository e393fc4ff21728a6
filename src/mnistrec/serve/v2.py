"""The Open Inference Protocol (KServe v2 / Triton HTTP), so standard clients work unchanged.

One input tensor, any name, holding raw pixels as the model sees them (no
preprocessing): ``FP32`` or ``FP64`` in [0, 1] with ink = 1, or ``UINT8`` in
0..255, of shape ``[N, 1, 28, 28]``, ``[N, 28, 28]`` or ``[N, 784]``; ``data``
flat (row-major) or nested. Outputs: ``probabilities`` (FP32 ``[N, 10]``),
``digit`` (INT64 ``[N]``), ``confidence`` (FP32 ``[N]``) and ``unsure`` (BOOL
``[N]``, confidence below the "not sure" threshold); probabilities are calibrated
(the checkpoint's temperature is applied). Ask for a subset
with ``outputs``. Errors carry the protocol's ``error`` field (and ``detail``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .. import __version__
from .inputs import InputError, as_images, pixels_to_tensor
from .service import ERRORS, MAX_BATCH_LIMIT, Service

SCALES = {"FP32": 1.0, "FP64": 1.0, "UINT8": 255.0}
OUTPUTS = {"probabilities": "FP32", "digit": "INT64", "confidence": "FP32", "unsure": "BOOL"}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class InferInput(BaseModel):
    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=2, max_length=4,
                                                     description="[N, 1, 28, 28], [N, 28, 28] or [N, 784]")
    datatype: Literal["FP32", "FP64", "UINT8"] = Field(description="FP32 or FP64 in [0, 1] (ink = 1), or UINT8 in 0..255")
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(min_length=1, max_length=MAX_BATCH_LIMIT * 784,
                            description="the values, flat (row-major) or nested")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = Field(None, max_length=len(OUTPUTS))


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``{"$ref": "#/$defs/X"}`` replaced by X itself (the models here are not recursive)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def _request_doc() -> dict[str, Any]:
    """The OpenAPI request body of ``infer``, which reads its body itself (to bound and move the parsing)."""
    schema = InferRequest.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))}}}}


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[int] | list[bool]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutput]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def _input_tensor(tensor: InferInput, max_batch: int):
    """Validate one v2 input and return it as float ``[N, 1, 28, 28]``."""
    shape = tensor.shape  # datatype, rank and positive sizes are checked by the schema
    x = pixels_to_tensor(tensor.data, SCALES[tensor.datatype], what=f"input {tensor.name!r}")
    expected = 1
    for d in shape:
        expected *= d
    if x.numel() != expected:
        raise InputError(f"input {tensor.name!r}: shape {shape} needs {expected} values, data has {x.numel()}")
    if shape[0] > max_batch:
        raise InputError(f"batch of {shape[0]} images exceeds the limit of {max_batch}")
    return as_images(x.reshape(shape), what=f"input {tensor.name!r}")


def make_router(service: Service, errors: dict = ERRORS) -> APIRouter:
    """The ``/v2`` routes for ``service``; unknown model names get 404."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    not_found = {404: {"model": errors[400]["model"], "description": "unknown model name"}}

    # The one name this server answers to, documented as such in the OpenAPI document.
    def name_param():
        return PathParam(description="the model's name", json_schema_extra={"enum": [service.name]})

    def check_name(name: str) -> None:
        if name != service.name:
            raise HTTPException(404, f"unknown model {name!r}; this server serves {service.name!r}")

    @router.get("", response_model=ServerMetadata)
    async def server_metadata() -> dict[str, Any]:
        """Server metadata."""
        return {"name": "mnistrec", "version": __version__, "extensions": []}

    @router.get("/health/live", response_model=Live)
    async def live() -> dict[str, Any]:
        """The server is up."""
        return {"live": True}

    @router.get("/health/ready", response_model=Ready)
    async def ready() -> dict[str, Any]:
        """The model is loaded: create_app loads it before the server accepts requests."""
        return {"ready": True}

    @router.get("/models/{name}", response_model=ModelMetadata, responses=not_found)
    async def model_metadata(name: str = name_param()) -> dict[str, Any]:
        """Inputs and outputs of the model."""
        check_name(name)
        return {
            "name": service.name, "versions": ["1"], "platform": "pytorch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "digit", "datatype": "INT64", "shape": [-1]},
                        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
                        {"name": "unsure", "datatype": "BOOL", "shape": [-1]}],
        }

    @router.get("/models/{name}/ready", response_model=ModelReady, responses=not_found)
    async def model_ready(name: str = name_param()) -> dict[str, Any]:
        """Whether the named model is ready."""
        check_name(name)
        return {"name": service.name, "ready": True}

    @router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
                 responses={**errors, **not_found}, openapi_extra=_request_doc())
    async def infer(http: Request, name: str = name_param()) -> dict[str, Any]:
        """Run the model on raw pixels (see the module docs for shapes and datatypes)."""
        check_name(name)
        # Read and parse here, not as a FastAPI body parameter: FastAPI would parse any size on the event loop.
        request = await service.parse_json(InferRequest, await http.body())
        wanted = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
        unknown = [n for n in wanted if n not in OUTPUTS]
        if unknown:
            raise InputError(f"unknown output {unknown[0]!r}; choose from {', '.join(OUTPUTS)}")
        x = await service.decode(_input_tensor, request.inputs[0], service.max_batch_images)
        results = await service.batcher.run(x)
        n = len(results)
        columns = {
            "probabilities": ([n, 10], [p for r in results for p in r["probabilities"]]),
            "digit": ([n], [int(r["digit"]) for r in results]),
            "confidence": ([n], [float(r["confidence"]) for r in results]),
            "unsure": ([n], [bool(r["unsure"]) for r in results]),
        }
        outputs = [{"name": o, "datatype": OUTPUTS[o], "shape": columns[o][0], "data": columns[o][1]} for o in wanted]
        return {"model_name": service.name, "model_version": "1", "id": request.id, "outputs": outputs}

    return router
