"""The one error type the HTTP side raises, and OpenAI's JSON shape for it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from edgepaged.server.protocol import ErrorDetail, ErrorResponse


class ApiError(Exception):
    """An error the client caused or must know about, with its OpenAI status, type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)
