"""No request can take a replica down; failures and shutdown never hang.

One regression test per row of the hostile-client probe (issue "Server hardening"), each
against a real ``python -m fbjax.serve`` process on loopback, and fault injection into
the engine thread of a real server (``tests/serve/faulty_server.py``).
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.serve.server import DONE, ServerProcess, metric, sse_event

KEY = "hardening-key"
MAX_QUEUE = 16


def read_http_reply(sock: socket.socket) -> bytes:
    """Read one whole HTTP reply: headers and body may come in separate packets."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        part = sock.recv(65536)
        if not part:
            return reply
        reply += part
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def raw(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def stream(url: str, body: dict, key: str | None = KEY, timeout: float = 120) -> dict:
    """One streamed completion: its text, finish reason and any error event."""
    out = {"text": "", "finish_reason": None, "error": None, "done": False}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            event = sse_event(line)
            if event is None:
                continue
            if event == DONE:
                out["done"] = True
                break
            if "error" in event:
                out["error"] = event["error"]
                continue
            choice = event["choices"][0]
            out["text"] += choice["text"]
            out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    return out


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(KEY + "\n")
    proc = ServerProcess("--api_key_file", str(key_file), "--max_queue", str(MAX_QUEUE),
                         "--header_timeout_s", "1", "--max_connections", "24",
                         "--max_body_bytes", "1000000")
    yield proc
    proc.stop()


def post(server, body, *, key: str | None = KEY, content: bytes | None = None,
         path: str = "/v1/completions", headers: dict | None = None) -> httpx.Response:
    headers = dict(headers or {})
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {key}")
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ----- D1, D2: values the compiled step cannot hold --------------------------------------

def test_huge_top_k_is_a_400_and_running_requests_are_untouched(hardened):
    thread, result = in_background(stream, hardened.url, {"prompt": "keep going",
                                                          "max_tokens": 48,
                                                          "ignore_eos": True})
    time.sleep(0.5)
    for top_k in (2147483648, 10**6, 321):
        r = post(hardened, {"prompt": "x", "max_tokens": 4, "top_k": top_k})
        assert "vocabulary" in assert_openai_error(r, 400, "top_k")["message"]
    thread.join(120)
    out = result[0]
    assert out["error"] is None and out["finish_reason"] == "length" and out["done"]
    ok = post(hardened, {"prompt": "x", "max_tokens": 2, "top_k": 5})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("field", ["slo_tpot_ms", "slo_ttft_ms"])
@pytest.mark.parametrize("value", [5e-324, 1e-300, 0.5, 1e12])
def test_slo_outside_1ms_to_7_days_is_a_400_and_load_stays_up(hardened, field, value):
    r = post(hardened, {"prompt": "x", "max_tokens": 2, field: value, "stream": True})
    assert_openai_error(r, 400, field)
    load = httpx.get(hardened.url + "/load", timeout=30)
    assert load.status_code == 200, load.text


def test_engine_validation_holds_offline_too(builtin_model):
    from fbjax.engine.engine import LLMEngine
    from fbjax.sched.request import InvalidRequestError, SamplingParams
    from tests.conftest import engine_config

    engine = LLMEngine(engine_config(), loaded=builtin_model)
    for sampling, kw, param in [
            (SamplingParams(top_k=2**31), {}, "top_k"),
            (SamplingParams(stop_token_ids=(10**6,)), {}, "stop_token_ids"),
            (SamplingParams(), {"tpot_slo": 5e-324}, "tpot_slo"),
            (SamplingParams(), {"ttft_slo": float("nan")}, "ttft_slo")]:
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request("hello", sampling, **kw)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("\ud800", SamplingParams())
    assert e.value.param == "prompt"
    for bad in [{"max_tokens": True}, {"max_tokens": 2.0}, {"top_k": 1.5},
                {"temperature": float("inf")}, {"seed": -1}, {"seed": 2**32}]:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    assert not engine.has_unfinished_requests()


# ----- D5, D8, D9: bad bodies are clear 4xx --------------------------------------------

@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', "messages"),
])
def test_lone_surrogates_are_a_400(hardened, path, body, param):
    r = post(hardened, None, content=body, path=path)
    assert "Unicode" in assert_openai_error(r, 400, param)["message"]


def test_a_request_that_can_never_be_queued_is_a_400_naming_the_limit(hardened):
    r = post(hardened, {"prompt": ["a"] * 300, "max_tokens": 1})
    assert "--max_queue" in assert_openai_error(r, 400)["message"]
    r = post(hardened, {"prompt": ["a", "b"], "n": 9, "max_tokens": 1})
    assert "18 completions" in assert_openai_error(r, 400)["message"]
    r = post(hardened, {"prompt": ["a", "b"], "n": 8, "max_tokens": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [("max_tokens", "10"), ("max_tokens", True),
                                         ("n", 1.0), ("stream", 1), ("top_k", "5"),
                                         ("seed", "7"), ("temperature", "0.5")])
def test_loose_types_are_refused(hardened, field, value):
    r = post(hardened, {"prompt": "x", field: value})
    assert_openai_error(r, 422, field)


# ----- D6, D7: bodies, headers, connections -----------------------------------------------

def test_oversized_body_is_a_413_before_it_is_read(hardened):
    host, port = raw(hardened.url)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: 50000000\r\n\r\n{\"prompt\": \"")
        start = time.monotonic()
        reply = read_http_reply(s)
        assert time.monotonic() - start < 5
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply
    # A chunked body is cut off as soon as it passes the limit.
    chunks = (b"x" * 100_000 for _ in range(20))
    r = httpx.post(hardened.url + "/v1/completions", content=chunks, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    assert_openai_error(r, 413)
    assert httpx.get(hardened.url + "/health", timeout=5).status_code == 200


def test_slow_and_silent_connections_are_closed(hardened):
    host, port = raw(hardened.url)
    silent = socket.create_connection((host, port), timeout=10)
    slow = socket.create_connection((host, port), timeout=10)
    start = time.monotonic()
    closed_silent = closed_slow = None
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    for i, byte in enumerate(request):
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            closed_slow = time.monotonic() - start
            break
        time.sleep(0.05)
        if i % 10 == 0 and closed_silent is None:
            silent.setblocking(False)
            try:
                if silent.recv(1) == b"":
                    closed_silent = time.monotonic() - start
            except BlockingIOError:
                pass
            silent.setblocking(True)
    if closed_slow is None:  # the server closed it; the next read says so
        slow.settimeout(5)
        assert slow.recv(1) == b""
        closed_slow = time.monotonic() - start
    assert closed_silent is not None and closed_silent < 4
    assert closed_slow < 6
    silent.close()
    slow.close()
    assert httpx.get(hardened.url + "/health", timeout=5).status_code == 200


def test_connections_beyond_the_cap_are_closed_at_once(hardened):
    host, port = raw(hardened.url)
    held = [socket.create_connection((host, port), timeout=5) for _ in range(30)]
    time.sleep(0.3)
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    for s in held:
        s.close()
    assert closed >= 30 - 24
    time.sleep(1.5)  # the header timeout closes the rest
    assert httpx.get(hardened.url + "/health", timeout=5).status_code == 200


# ----- D10: the API key -------------------------------------------------------------------

@pytest.mark.parametrize("header,status", [(f"Bearer {KEY}", 200), (f"bearer {KEY}", 200),
                                           (f"BEARER  {KEY}", 200), ("Bearer nope", 401),
                                           (f"Basic {KEY}", 401), (KEY, 401)])
def test_api_key_scheme_is_case_insensitive_and_the_key_exact(hardened, header, status):
    r = post(hardened, {"prompt": "x", "max_tokens": 1}, key=None,
             headers={"Authorization": header})
    assert r.status_code == status, r.text


def test_api_key_from_the_environment(tmp_path):
    proc = ServerProcess(env={"FBJAX_API_KEY": "from-env"})
    try:
        assert post(proc, {"prompt": "x", "max_tokens": 1}, key="from-env").status_code == 200
        assert post(proc, {"prompt": "x", "max_tokens": 1}, key="other").status_code == 401
    finally:
        proc.stop()


# ----- metrics count every outcome --------------------------------------------------------

def test_metrics_count_rejections_by_status(hardened):
    """Each rejection made here (not relying on other tests: under xdist a module-scoped
    server may be rebuilt between them)."""
    post(hardened, {"prompt": "x", "top_k": 10**9})
    post(hardened, {"prompt": "x"}, key="wrong")
    too_large = httpx.post(hardened.url + "/v1/completions", content=b"x" * 1_100_000,
                           timeout=30, headers={"Authorization": f"Bearer {KEY}",
                                                "Content-Type": "application/json"})
    assert too_large.status_code == 413
    text = httpx.get(hardened.url + "/metrics", timeout=10).text
    assert metric(text, "fbjax_requests_rejected_total", {"status": "400"}) >= 1
    assert metric(text, "fbjax_requests_rejected_total", {"status": "401"}) >= 1
    assert metric(text, "fbjax_requests_rejected_total", {"status": "413"}) >= 1


# ----- D3, D4: shutdown and engine faults never hang ---------------------------------------

def test_sigterm_exits_within_the_grace_while_a_client_holds_half_a_body():
    proc = ServerProcess("--shutdown_grace_s", "1")
    host, port = raw(proc.url)
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
    time.sleep(0.3)
    start = time.monotonic()
    proc.signal()
    code = proc.proc.wait(20)
    assert time.monotonic() - start < 1 + 2 + 3  # grace + margin + process exit
    assert code == 0, proc.log()
    s.close()
    proc.stop()


@pytest.fixture
def faulty(tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("")
    proc = ServerProcess("--engine_stall_timeout_s", "3", "--shutdown_grace_s", "1",
                         module="tests.serve.faulty_server",
                         env={"FBJAX_TEST_FAULT_FILE": str(fault)})
    proc.fault = fault
    yield proc
    proc.stop()


LONG = {"prompt": "tell me more", "max_tokens": 200, "ignore_eos": True}


def test_an_idle_engine_is_not_a_stalled_one(faulty):
    """Idle for longer than the stall timeout, then a burst: every request is served."""
    time.sleep(4)
    threads = [in_background(lambda i=i: post(faulty, {"prompt": f"burst {i}",
                                                         "max_tokens": 3}, key=None))
               for i in range(8)]
    for thread, result in threads:
        thread.join(60)
        assert result and result[0].status_code == 200, result and result[0].text
    assert httpx.get(faulty.url + "/health", timeout=5).status_code == 200


def test_a_failed_step_answers_every_request_and_the_engine_goes_on(faulty):
    threads = [in_background(stream, faulty.url, LONG, None) for _ in range(3)]
    time.sleep(1.0)
    faulty.fault.write_text("step")
    for thread, result in threads:
        thread.join(60)
        assert result and result[0]["error"] is not None and result[0]["done"], result
        assert "engine step failed" in result[0]["error"]["message"]
    assert httpx.get(faulty.url + "/health", timeout=5).status_code == 200
    r = post(faulty, {"prompt": "again", "max_tokens": 3}, key=None)
    assert r.status_code == 200, r.text
    text = httpx.get(faulty.url + "/metrics", timeout=10).text
    assert metric(text, "fbjax_requests_total", {"finish_reason": "error"}) >= 3
    assert metric(text, "fbjax_kv_cache_free_pages") == metric(text,
                                                               "fbjax_kv_cache_total_pages")


def test_a_fault_after_the_scheduler_finished_a_request_still_answers_it(faulty):
    faulty.fault.write_text("after_step")
    start = time.monotonic()
    r = post(faulty, {"prompt": "one token", "max_tokens": 1}, key=None)
    assert time.monotonic() - start < 30
    assert_openai_error(r, 500)
    assert r.json()["error"]["code"] == "engine_error"
    assert post(faulty, {"prompt": "x", "max_tokens": 2}, key=None).status_code == 200


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_dead_or_stalled_engine_fails_everyone_fast_and_sigterm_still_exits(faulty, fault):
    threads = [in_background(stream, faulty.url, LONG, None) for _ in range(2)]
    time.sleep(1.0)
    faulty.fault.write_text(fault)
    for thread, result in threads:
        thread.join(30)
        assert result and result[0]["error"] is not None and result[0]["done"], result
        assert "engine failed" in result[0]["error"]["message"]
    health = httpx.get(faulty.url + "/health", timeout=5)
    assert_openai_error(health, 503)
    assert health.json()["error"]["code"] == "engine_failed"
    assert_openai_error(httpx.get(faulty.url + "/load", timeout=5), 503)
    r = post(faulty, {"prompt": "x", "max_tokens": 2}, key=None)
    assert_openai_error(r, 503)
    start = time.monotonic()
    faulty.signal()
    faulty.proc.wait(30)
    assert time.monotonic() - start < 15
