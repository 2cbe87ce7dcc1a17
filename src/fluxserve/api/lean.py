"""The lean path: the hot routes (every dialect's poll of a job, and its JSON create) answered without
FastAPI's per-request machinery.

A poll is most of an API node's load (clients poll every 0.5-3 s per job in flight). Measured in-process on
the 2-core CI machine, a Replicate poll cost ~580 us through FastAPI of which ~200 us were its exception
middleware, the scan of ~150 routes, dependency solving and the response model's validation; the job read,
its rendering and our middlewares (logs, ETag, CORS) are the rest. A create pays the same: an OpenAI create cost
1.29-1.46 ms of CPU in-process through FastAPI, 1.13-1.19 ms here (interleaved, two runs). A route marked ``@lean`` is
answered here instead, by its own endpoint function: this resolves the endpoint's parameters itself (path
parameters, scalar query parameters, ``ServicesDep``, an ``OwnerFrom`` key dependency and the ``Request``,
from which a create reads and validates its own body, as it does under FastAPI; the only kinds allowed,
checked when the app is built) and encodes its dict with pydantic's serializer, as FastAPI does. The answer
is the same either way (tests/api/test_lean.py compares them route by route: polls byte for byte, creates by
status, headers and shape, refusals byte for byte).

It sits inside every middleware of ours (request log, job headers, CORS, body limit) and outside FastAPI's
router: what it does not answer (another method or path, a query it cannot read) goes on to the router
unchanged. Errors raised by an endpoint are answered by the app's own exception handlers, found as Starlette
finds them (the nearest class in the exception's MRO); anything without one goes up to the server error
middleware, as it would from the router.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core
from fastapi import params
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from .deps import OwnerFrom, owner_of, services_dep

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_LEAN = "__fluxserve_lean__"
# A bool query parameter read by pydantic, as FastAPI reads it; a value it refuses goes on to FastAPI's 422.
_BOOL = TypeAdapter(bool)


def lean(endpoint: F) -> F:
    """Mark a GET or POST endpoint to be answered by the lean path (under the route decorator)."""
    setattr(endpoint, _LEAN, True)
    return endpoint


@dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "path", "services", "owner", "request", "str", "bool"
    owner: OwnerFrom | None = None
    default: Any = None


@dataclass(frozen=True)
class LeanPlan:
    route: APIRoute
    params: tuple[_Param, ...]
    shadows: tuple[BaseRoute, ...]  # routes before it that could match one of its paths: tried first
    status: int
    prefix: str  # its path up to its first parameter: a path without it cannot match (no regex run for it)


def _depends(hint: Any, default: Any) -> Any:
    """The dependency a parameter names, in ``Annotated[..., Depends(f)]`` or as ``= Depends(f)``."""
    marks = [*typing.get_args(hint)[1:], default] if typing.get_origin(hint) is typing.Annotated else [default]
    found = [m.dependency for m in marks if isinstance(m, params.Depends)]
    return found[0] if found else None


def _param(route: APIRoute, name: str, hint: Any, default: Any) -> _Param:
    where = f"{route.path} ({route.endpoint.__qualname__})"
    dependency = _depends(hint, default)
    if hint is Request:  # the endpoint reads its own body (api/errors.read_json), as it does under FastAPI
        return _Param(name, "request")
    if dependency is services_dep:
        return _Param(name, "services")
    if isinstance(dependency, OwnerFrom):
        return _Param(name, "owner", owner=dependency)
    if dependency is not None or isinstance(default, params.Param):
        raise TypeError(f"{where}: the lean path cannot answer the parameter {name!r}")
    if name in route.param_convertors:
        if hint is not str:
            raise TypeError(f"{where}: lean path parameters are str; {name!r} is {hint!r}")
        return _Param(name, "path")
    if hint not in (str, bool) or default is inspect.Parameter.empty:
        raise TypeError(f"{where}: lean query parameters are str or bool with a default; {name!r} is not")
    return _Param(name, "str" if hint is str else "bool", default=default)


def _could_shadow(earlier: BaseRoute, route: APIRoute) -> bool:
    """Could ``earlier`` match a path ``route`` matches (for one of its methods)? Segment by segment: two
    literals must agree; a parameter matches any segment, a ``:path`` parameter the rest of the path. Anything
    else (a mount, another kind of route) is assumed to."""
    if isinstance(earlier, WebSocketRoute):
        return False
    if isinstance(earlier, Mount) or not isinstance(earlier, Route):
        return True
    if earlier.methods is not None and not earlier.methods & (route.methods or set()):
        return False
    mine, theirs = route.path.split("/"), earlier.path.split("/")
    for a, b in zip(mine, theirs, strict=False):
        if a.endswith(":path}") or b.endswith(":path}"):
            return True
        if a != b and not a.startswith("{") and not b.startswith("{"):
            return False
    return len(mine) == len(theirs)


def plans(routes: Sequence[BaseRoute]) -> list[LeanPlan]:
    """A plan for each ``@lean`` route, in routing order; a route the lean path cannot answer exactly as FastAPI
    would is an error here, at build time, not a difference at run time."""
    out: list[LeanPlan] = []
    for i, route in enumerate(routes):
        if not (isinstance(route, APIRoute) and getattr(route.endpoint, _LEAN, False)):
            continue
        where = f"{route.path} ({route.endpoint.__qualname__})"
        response_class = getattr(route.response_class, "value", route.response_class)  # FastAPI's default is wrapped
        hints = typing.get_type_hints(route.endpoint, include_extras=True)
        # A dict is encoded with pydantic's serializer, as FastAPI does where the route has a response field (a
        # return annotation, "Any" included); without one it would use jsonable_encoder and json.dumps, so such
        # an endpoint must answer a Response itself.
        answers = hints.get("return")
        encoded = route.response_field is not None or (isinstance(answers, type) and issubclass(answers, Response))
        plain = not route.dependencies and response_class is JSONResponse and encoded
        if route.methods not in ({"GET"}, {"POST"}) or not plain:
            raise TypeError(f"{where}: lean routes are plain GETs or POSTs answered in JSON")
        signature = inspect.signature(route.endpoint)
        found = tuple(_param(route, n, hints[n], p.default) for n, p in signature.parameters.items())
        shadows = tuple(r for r in routes[:i] if _could_shadow(r, route))
        prefix = route.path.partition("{")[0]
        out.append(LeanPlan(route, found, shadows, route.status_code or 200, prefix))
    return out


def _query(plan: LeanPlan, scope: Scope) -> dict[str, Any] | None:
    """The plan's query parameters, read as FastAPI reads them; None when one needs FastAPI (it answers 422)."""
    query = QueryParams(scope["query_string"]) if scope["query_string"] else None
    values: dict[str, Any] = {}
    for p in plan.params:
        if p.kind not in ("str", "bool"):
            continue
        raw = query.get(p.name) if query is not None else None
        if raw is None:
            values[p.name] = p.default
        elif p.kind == "str":
            values[p.name] = raw
        else:
            try:
                values[p.name] = _BOOL.validate_python(raw)
            except ValidationError:
                return None
    return values


class LeanReads:
    def __init__(self, app: ASGIApp, plans: Sequence[LeanPlan]) -> None:
        self.app = app
        self._plans = plans

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "POST"):
            path = _route_path(scope)
            for plan in self._plans:
                if not path.startswith(plan.prefix) or scope["method"] not in (plan.route.methods or ()):
                    continue
                match, child = plan.route.matches(scope)
                if match is not Match.FULL:
                    continue
                if any(r.matches(scope)[0] is Match.FULL for r in plan.shadows):
                    break  # another route answers this path first: the router's
                values = _query(plan, scope)
                if values is None:
                    break
                scope.update(child)
                await self._answer(plan, values, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, plan: LeanPlan, values: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        try:
            response = await self._run(plan, values, scope, receive)
        except Exception as exc:
            handler = _handler(app.exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    @staticmethod
    async def _run(plan: LeanPlan, values: dict[str, Any], scope: Scope, receive: Receive) -> Response:
        for p in plan.params:
            if p.kind == "request":
                values[p.name] = Request(scope, receive)
            elif p.kind == "path":
                values[p.name] = scope["path_params"][p.name]
            elif p.kind == "services":
                values[p.name] = scope["app"].state.services
            elif p.kind == "owner":
                assert p.owner is not None
                key = p.owner.read_key(Headers(scope=scope))
                values[p.name] = await owner_of(scope["app"].state.services, key)
        result = await plan.route.endpoint(**values)
        if isinstance(result, Response):
            return result
        if not isinstance(result, (dict, list)) or plan.route.response_field is None:  # see plans()
            raise TypeError(f"{plan.route.path}: a lean endpoint answers a dict, a list or a Response")
        return Response(pydantic_core.to_json(result), status_code=plan.status, media_type="application/json")


def _route_path(scope: Scope) -> str:
    """The path routes match, as Starlette's routing reads it (``root_path`` taken off where it leads)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def _handler(handlers: dict[Any, Any], exc: Exception) -> Callable[..., Awaitable[Response]] | None:
    """The app's handler for ``exc`` as Starlette's exception middleware finds it (``Exception`` and 500 are
    the server error middleware's, above this)."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            found: Callable[..., Awaitable[Response]] = handlers[cls]
            return found
    return None
