from tests.conftest import ROUTES_APP, free_port, http_request, wait_http


def test_serves_routes_app(procs):
    port = free_port()
    proc = procs.chaussette("--port", str(port), ROUTES_APP)
    wait_http(("127.0.0.1", port), proc)
    resp = http_request(("127.0.0.1", port), "/echo", "POST", body=b"abc")
    assert resp.status == 200
    assert resp.body.startswith(b"3 ")
    assert proc.stop() == 0
