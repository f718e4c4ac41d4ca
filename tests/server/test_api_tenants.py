"""Tenants from an --api-keys file: each sees and uses only its adapters; another
tenant's adapter is a 404 indistinguishable from a missing one; no key is 401; the
admin routes need an admin key; a tenant's request rate is limited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from server_harness import Assets, Running, free_socket, metric, start_server

from loraserve.server.auth import Tenants

KEYS = {
    "sk-alpha": {"tenant": "alpha", "adapters": ["attn8", "all6"]},
    "sk-alpha-2": {"tenant": "alpha", "adapters": ["attn8", "all6"]},
    "sk-beta": {"tenant": "beta", "adapters": ["mlp4"], "base_model": False},
    "sk-gamma": {"tenant": "gamma", "adapters": ["mlp4"], "requests_per_minute": 2},
    "sk-ops": {"tenant": "ops", "adapters": "*", "admin": True},
    "sk-delta": {"tenant": "delta", "prefix_cache_group": "team"},
    "sk-epsilon": {"tenant": "epsilon", "prefix_cache_group": "team"},
}


METRICS_KEY = "sk-prometheus-scrape"


@pytest.fixture(scope="module")
def running(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("keys")
    (folder / "keys.yaml").write_text(yaml.safe_dump(KEYS))
    (folder / "metrics-key").write_text(METRICS_KEY + "\n")  # as a Secret file may hold it
    server = start_server(
        assets,
        tenants=Tenants.from_file(folder / "keys.yaml"),
        allowed_adapter_roots=(str(assets.spare_dir),),
        metrics_key_file=str(folder / "metrics-key"),
        metrics_socket=free_socket(),
    )
    yield server
    server.server.stop()


def visible(running: Running, key: str) -> set[str]:
    return {model.id for model in running.server.client(key).models.list().data}


def complete(running: Running, key: str, model: str) -> str:
    response = running.server.client(key).completions.create(
        model=model, prompt="hello", max_tokens=2, temperature=0
    )
    return response.choices[0].text


def test_each_tenant_sees_only_its_models(running: Running) -> None:
    base = running.engine.info.served_model_name
    assert visible(running, "sk-alpha") == {base, "attn8", "all6"}
    assert visible(running, "sk-alpha-2") == {base, "attn8", "all6"}
    assert visible(running, "sk-beta") == {"mlp4"}
    assert visible(running, "sk-ops") == {base, "attn8", "all6", "mlp4"}


def test_another_tenants_adapter_is_404_like_a_missing_one(running: Running) -> None:
    errors = []
    for model in ("mlp4", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as caught:
            complete(running, "sk-alpha", model)
        errors.append(caught.value.body)
    hidden, missing = errors
    assert hidden == {**missing, "message": missing["message"].replace("no-such-adapter", "mlp4")}
    with pytest.raises(openai.NotFoundError):
        complete(running, "sk-beta", running.engine.info.served_model_name)
    assert complete(running, "sk-alpha", "attn8") == complete(running, "sk-ops", "attn8")


@pytest.mark.parametrize("key", [None, "sk-wrong", "sk-alph"])
def test_a_missing_or_wrong_key_is_401(running: Running, key: str | None) -> None:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    with running.server.http() as http:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            body = {"model": "attn8", "prompt": "hello"} if method == "POST" else None
            response = http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["message"]
    with pytest.raises(openai.AuthenticationError):
        running.server.client("sk-wrong").models.list()
    assert complete(running, "sk-alpha", "attn8")  # still serving


def test_health_needs_no_key_and_metrics_an_admin_or_the_metrics_key(running: Running) -> None:
    with running.server.http() as http:
        assert http.get("/health").status_code == 200
        for key, status in [
            (None, 401),
            ("sk-wrong", 401),
            ("sk-alpha", 403),  # a tenant must not learn about other tenants' adapters
            ("sk-ops", 200),
            (METRICS_KEY, 200),
        ]:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            response = http.get("/metrics", headers=headers)
            assert response.status_code == status, (key, response.text)
        assert "vllm:num_requests_running" in response.text
        metrics_only = {"Authorization": f"Bearer {METRICS_KEY}"}
        assert http.get("/v1/models", headers=metrics_only).status_code == 401  # nothing else


def test_the_metrics_port_serves_metrics_and_health_only_without_a_key(running: Running) -> None:
    (metrics_url,) = running.server.extra_urls
    with httpx.Client(base_url=metrics_url, timeout=30) as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            response = http.request(method, path, headers={"Authorization": "Bearer sk-ops"})
            assert response.status_code == 404, path
    assert complete(running, "sk-alpha", "attn8")  # the API port is untouched


def test_only_admins_see_adapter_folders(running: Running) -> None:
    for key, admin in (("sk-alpha", False), ("sk-ops", True)):
        with running.server.http() as http:
            cards = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        roots = {card["id"]: card.get("root") for card in cards["data"] if card.get("parent")}
        assert roots
        for name, root in roots.items():
            assert (root == str(running.engine.adapters[name])) if admin else root is None


def test_admin_routes_need_an_admin_key(running: Running, assets: Assets) -> None:
    body = {"lora_name": "extra", "lora_path": str(assets.spare_dir / "extra")}
    with running.server.http() as http:
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401
        alpha = {"Authorization": "Bearer sk-alpha"}
        response = http.post("/v1/load_lora_adapter", json=body, headers=alpha)
        assert (
            response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
        )
        ops = {"Authorization": "Bearer sk-ops"}
        assert http.post("/v1/load_lora_adapter", json=body, headers=ops).status_code == 200
    assert "extra" in visible(running, "sk-ops")
    assert "extra" not in visible(running, "sk-alpha")  # not in alpha's list
    with running.server.http() as http:
        unload = {"lora_name": "extra"}
        assert http.post("/v1/unload_lora_adapter", json=unload, headers=alpha).status_code == 403
        assert http.post("/v1/unload_lora_adapter", json=unload, headers=ops).status_code == 200


def test_a_tenant_over_its_rate_is_429_with_retry_after(running: Running) -> None:
    complete(running, "sk-gamma", "mlp4")
    complete(running, "sk-gamma", "mlp4")
    with running.server.http() as http:
        response = http.post(
            "/v1/completions",
            json={"model": "mlp4", "prompt": "hello", "max_tokens": 2},
            headers={"Authorization": "Bearer sk-gamma"},
        )
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert complete(running, "sk-beta", "mlp4")  # other tenants are not limited by it


def test_completions_count_against_the_rate(assets: Assets, tmp_path: Path) -> None:
    """n completions cost n; more than a minute's worth in one request is never possible."""
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(KEYS))
    server = start_server(assets, tenants=Tenants.from_file(tmp_path / "keys.yaml"))
    try:
        client = server.server.client("sk-gamma")
        client.completions.create(model="mlp4", prompt="hi", max_tokens=1, n=2)  # both tokens
        with pytest.raises(openai.RateLimitError) as spent:
            client.completions.create(model="mlp4", prompt="hi", max_tokens=1)
        assert spent.value.response.headers.get("Retry-After")
        with pytest.raises(openai.RateLimitError) as never:
            client.completions.create(model="mlp4", prompt=["a", "b"], max_tokens=1, n=2)
        assert (
            "4 completions" in str(never.value)
            and "Retry-After" not in never.value.response.headers
        )
    finally:
        server.server.stop()


@pytest.mark.parametrize(
    "content",
    [
        "sk-x: {adapters: [a]}",  # no tenant
        "sk-x: {tenant: t, requests_per_minute: 0}",
        "sk-x: {tenant: t, admin: 'yes'}",
        "sk-x: {tenant: t, colour: blue}",
        "sk-x: {tenant: t}\nsk-y: {tenant: t, admin: true}",  # one tenant, two settings
        "[a, b]",
        "{: bad",
    ],
)
def test_a_bad_keys_file_is_refused_at_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        Tenants.from_file(path)


def test_keys_are_not_kept_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"sk-secret": {"tenant": "t"}}')
    tenants = Tenants.from_file(path)
    assert "sk-secret" not in repr(vars(tenants))
    assert tenants.authenticate("Bearer sk-secret").name == "t"
    with pytest.raises(Exception, match="API key"):
        tenants.authenticate("Basic sk-secret")


def test_the_prefix_cache_is_shared_within_a_tenant_or_its_group_only(running: Running) -> None:
    """Read from the hit counter, not the clock: a tenant never reuses blocks that another
    tenant cached (so cannot time whether it sent a prompt); its own keys, and tenants of
    one `prefix_cache_group`, do; a `cache_salt` shares only with the same salt."""
    prompt = "a system prompt that several tenants happen to send " * 4

    def hits_after(key: str, cache_salt: str | None = None) -> float:
        extra = {} if cache_salt is None else {"extra_body": {"cache_salt": cache_salt}}
        client = running.server.client(key)
        client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=1, temperature=0, **extra
        )
        with running.server.http() as http:
            text = http.get("/metrics", headers={"Authorization": "Bearer sk-ops"}).text
        return metric(text, "vllm:prefix_cache_hits_total")

    first = hits_after("sk-alpha")
    assert hits_after("sk-delta") == first, "another tenant's cached prompt is not reused"
    grouped = hits_after("sk-epsilon")
    assert grouped > first, "tenants of one prefix_cache_group share"
    own = hits_after("sk-alpha-2")
    assert own > grouped, "a tenant's keys share its cache"
    assert hits_after("sk-alpha", "s1") == own, "a salted request shares only with its salt"
    assert hits_after("sk-alpha-2", "s1") > own
