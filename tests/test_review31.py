"""Review 31: what the maintainer found in this session's changes, each shown on real parts and mended here.

The network probe behind a proxy asks it for the tunnel whatever case the proxy URL's scheme is written in,
as the calls (httpx reads ``HTTP://`` as ``http://``) do.
"""

from __future__ import annotations

import threading
from typing import Any

from .conftest import cloud_config, wait_for
from .test_mend31 import TunnelProxy


def test_a_proxy_url_in_capitals_is_asked_for_the_tunnel_its_calls_ask_for(daemon_factory: Any) -> None:
    """``HTTPS_PROXY=HTTP://host:port`` (curl and httpx read the scheme in any case, and the calls went through
    the tunnel) was taken for an https proxy, whose tunnel the probe cannot ask for: the probe connected to
    the proxy alone and status said the proxy reachable, with the endpoint behind it down (every call failing
    ``502 Bad Gateway``). The probe now asks it for the tunnel, as for ``http://``."""
    proxy = TunnelProxy("502 Bad Gateway")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    port = proxy.server_address[1]
    try:
        config = {**cloud_config("https://cloud.example.com/v1"), "telemetry": {"probe_interval_s": 1}}
        env = {"HTTPS_PROXY": f"HTTP://127.0.0.1:{port}", "LOCOD_CLOUD_API_KEY": "sk-test"}
        handle = daemon_factory(config, extra_env=env)

        def telemetry() -> dict[str, Any]:
            return handle.client().status()["telemetry"]  # type: ignore[no-any-return]

        probed = wait_for(lambda: telemetry() if telemetry()["cloud_reachable"] is not None else None, 60, "a probe")
        # on the old code: cloud_probed "proxy", reachable, and no CONNECT sent
        assert probed["cloud_probed"] == "tunnel" and probed["cloud_reachable"] is False, probed
        assert proxy.connects[0][0] == "CONNECT cloud.example.com:443 HTTP/1.1"
        assert f"cloud endpoint unreachable through proxy 127.0.0.1:{port}," in handle.cli("status").stdout
    finally:
        proxy.shutdown()
        proxy.server_close()
