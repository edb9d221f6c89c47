"""Why an answer ended is the answering backend's own word, at both doors.

The HTTP door inferred ``finish_reason`` from the token counts alone, so a cloud endpoint's
``content_filter`` (an answer its provider cut off) reached an OpenAI client as ``stop``: a complete answer.
The done frame now carries the backend's reason (llama.cpp's ``stop``/``length``, the endpoint's as it said
it) and the HTTP door passes it on. Real parts: the embedded model, the loopback llama_cpp.server as the
cloud behind the fault proxy, the openai SDK.
"""

from __future__ import annotations

from typing import Any

from .conftest import cloud_config
from .faultproxy import Fault, FaultProxy
from .test_http import LOCAL, http_daemon, sdk

CLOUD = "cloud-small"
HI = [{"role": "user", "content": "Say hi."}]


def test_a_cloud_endpoints_content_filter_reaches_both_doors_as_it_said_it(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=120.0))
    proxy.set(Fault(kind="finish", finish="content_filter"))

    whole = sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "content_filter"
    chunks = list(sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=8, temperature=0, stream=True))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["content_filter"]
    turn = handle.client().ask("Say hi.", model=CLOUD, max_tokens=8)
    assert turn.done.finish_reason == "content_filter" and turn.done.location == "cloud"


def test_the_reason_is_the_backends_stop_or_length(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A local answer ended at a stop string says ``stop``, one at its ``max_tokens`` ``length``; a cloud
    answer at its ``max_tokens`` says the endpoint's ``length``."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=120.0))
    client = handle.client()
    stopped = client.ask("Say hello to my friend Anna.", model=LOCAL, max_tokens=48, stop=" ", temperature=0)
    assert stopped.done.finish_reason == "stop" and " " not in stopped.text
    assert client.ask("Count to twenty.", model=LOCAL, max_tokens=2).done.finish_reason == "length"
    assert client.ask("Count to twenty.", model=CLOUD, max_tokens=2).done.finish_reason == "length"
    cut = sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=2, temperature=0)
    assert cut.choices[0].finish_reason == "length"
