"""The legacy Spotbot endpoint in process: the protocol's answers for every request
status, its errors, and how it authenticates. (tests/e2e/test_legacy_http.py speaks it
over a socket to a real `conveyor serve`, byte for byte as curl does.)

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_support import (
    ApiEnv,
    builtin_app,
    claim_all,
    finish,
    make_env,
    problem,
    run_request,
)
from conveyor.tasks import TaskAction

pytestmark = pytest.mark.anyio

URL = "/spotbot/spotbot_offline_submitter.php"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def spotbot_params(n: int = 2) -> dict[str, Any]:
    base = "P:/2022-12/2022-12-13/G2/20221213_Driving/A146B#1{i}/gps"
    return {
        "logs_to_process": [
            {
                "rawbinlog_bin": base.format(i=i) + "/rawbinlog.bin",
                "rawbinlog_time": base.format(i=i) + "/rawbinlog.time",
                "protocols_xml": base.format(i=i) + "/rawbinlog.protocols.xml",
                "output_dir": base.format(i=i),
            }
            for i in range(1, n + 1)
        ]
    }


def curl_body(params: Any) -> bytes:
    """What `curl -d @file` sends for a pretty-printed JSON file: newlines stripped."""
    return json.dumps(params, indent=4).replace("\n", "").encode()


@pytest.fixture
def legacy(db_url: str, tmp_path: Path) -> Any:
    made: list[ApiEnv] = []

    def make(extra_toml: str = "") -> ApiEnv:
        env = make_env(builtin_app(db_url, tmp_path, extra_toml))
        made.append(env)
        return env

    yield make
    for env in made:
        env.asgi.state.hub.close()
        env.app.close()


def client(api: ApiEnv) -> httpx.AsyncClient:
    return api.client(role=None)


async def status(c: httpx.AsyncClient, rid: Any, **kw: Any) -> str:
    r = await c.get(URL, params={"context": "STATUS_CHECK", "spotbot_offline_req_id": rid}, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    return r.text


async def test_submit_answers_the_id_and_status_check_follows_it(legacy: Any) -> None:
    api: ApiEnv = legacy()
    async with client(api) as c:
        r = await c.post(URL + "?context=SUBMIT", content=curl_body(spotbot_params()), headers=FORM)
        assert r.status_code == 200, r.text
        assert r.content.isdigit()  # the id alone: no newline, no JSON
        rid = int(r.content)
        req = api.app.get(rid)
        assert req.pipeline == "spotbot" and req.submitter == "legacy"
        assert req.params == spotbot_params()
        assert len(req.tasks) == 2

        assert await status(c, rid) == "REQUESTED"
        tasks = claim_all(api.store, rid)
        assert await status(c, rid) == "QUEUED"
        finish(api.store, tasks, TaskAction.SUCCEED)
        assert await status(c, rid) == "REQ_SUCCESS"

        failed = api.app.submit("spotbot", spotbot_params(1)).request.id
        run_request(api.store, failed, TaskAction.FAIL)
        assert await status(c, failed) == "REQ_FAILED"
        cancelled = api.app.submit("spotbot", spotbot_params(1)).request.id
        api.app.cancel(cancelled)
        assert await status(c, cancelled) == "REQ_FAILED"

        for unknown in ("999999", "abc", "-1", "", "99999999999999999999999", "\u00b2", "\u0663"):
            assert await status(c, unknown) == "REQ_NOT_FOUND", unknown
        other = api.app.submit("noop", {}).request.id  # not a Spotbot request
        assert await status(c, other) == "REQ_NOT_FOUND"


async def test_any_content_type_and_post_for_status(legacy: Any) -> None:
    api: ApiEnv = legacy()
    async with client(api) as c:
        body = json.dumps(spotbot_params(1)).encode()
        for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"}, {}):
            r = await c.post(URL, params={"context": "SUBMIT"}, content=body, headers=headers)
            assert r.status_code == 200 and r.text.isdigit(), r.text
        r = await c.post(
            URL, params={"context": "STATUS_CHECK", "spotbot_offline_req_id": r.text}, headers=FORM
        )
        assert r.text == "REQUESTED"


async def test_errors_are_problem_documents(legacy: Any) -> None:
    api: ApiEnv = legacy()
    async with client(api) as c:
        body = problem(
            await c.post(URL + "?context=SUBMIT", content=b'{"logs_to', headers=FORM), 400
        )
        assert "not valid JSON" in body["detail"]
        problem(await c.post(URL + "?context=SUBMIT", content=b"", headers=FORM), 400)
        problem(await c.get(URL + "?context=SUBMIT"), 400)  # no body at all

        bad = spotbot_params(2)
        del bad["logs_to_process"][1]["output_dir"]
        body = problem(await c.post(URL + "?context=SUBMIT", content=curl_body(bad)), 422)
        assert body["errors"][0]["path"] == "$.logs_to_process[1].output_dir"

        body = problem(await c.get(URL, params={"context": "DELETE"}), 422)
        assert "SUBMIT" in body["detail"] and body["errors"][0]["path"] == "query.context"
        assert "SUBMIT" in problem(await c.get(URL), 400)["detail"]
        body = problem(await c.get(URL, params={"context": "STATUS_CHECK"}), 400)
        assert body["errors"][0]["path"] == "query.spotbot_offline_req_id"


async def test_the_pipeline_comes_from_the_config(legacy: Any) -> None:
    api: ApiEnv = legacy('[legacy]\npipeline = "noop"\n')
    async with client(api) as c:
        r = await c.post(URL + "?context=SUBMIT", content=b'{"anything": [1, 2]}', headers=FORM)
        assert r.status_code == 200
        assert api.app.get(int(r.text)).pipeline == "noop"
        assert await status(c, r.text) == "REQUESTED"


async def test_a_required_token_comes_as_a_header_or_in_the_url(legacy: Any) -> None:
    api: ApiEnv = legacy("[legacy]\nrequire_token = true\n")
    body = curl_body(spotbot_params(1))
    async with client(api) as c:
        r = await c.post(URL + "?context=SUBMIT", content=body, headers=FORM)
        assert "needs a token" in problem(r, 401)["detail"]
        problem(
            await c.get(URL, params={"context": "STATUS_CHECK", "spotbot_offline_req_id": 1}), 401
        )

        r = await c.post(
            URL + "?context=SUBMIT", content=body, headers={**FORM, **api.auth("submit")}
        )
        assert r.status_code == 200
        rid = r.text
        assert api.app.get(int(rid)).submitter == "submit-user"
        token = api.tokens["submit"]
        r = await c.post(URL + f"?context=SUBMIT&token={token}", content=body, headers=FORM)
        assert r.status_code == 200 and r.text.isdigit()

        # a read token may check, not submit
        assert await status(c, rid, headers=api.auth("read")) == "REQUESTED"
        r = await c.get(
            URL,
            params={
                "context": "STATUS_CHECK",
                "spotbot_offline_req_id": rid,
                "token": api.tokens["read"],
            },
        )
        assert r.text == "REQUESTED"
        r = await c.post(
            URL + "?context=SUBMIT", content=body, headers={**FORM, **api.auth("read")}
        )
        problem(r, 403)
        r = await c.post(URL + "?context=SUBMIT&token=cvy_nope_nope_nope", content=body)
        problem(r, 401)


async def test_without_require_token_a_sent_token_is_still_checked(legacy: Any) -> None:
    api: ApiEnv = legacy()
    async with client(api) as c:
        body = curl_body(spotbot_params(1))
        bad = {"Authorization": "Bearer cvy_" + "D" * 43}
        problem(await c.post(URL + "?context=SUBMIT", content=body, headers=bad), 401)
        r = await c.post(URL + "?context=SUBMIT", content=body, headers=api.auth("admin"))
        assert api.app.get(int(r.text)).submitter == "admin-user"


async def test_without_its_pipeline_the_endpoint_says_so(make_api: Any) -> None:
    api: ApiEnv = make_api()  # echo, plain, cached: no spotbot
    async with client(api) as c:
        r = await c.post(URL + "?context=SUBMIT", content=b"{}", headers=FORM)
        assert "no pipeline 'spotbot'" in problem(r, 404)["detail"]
