"""The web's health and readiness answers (app/api.py: /healthz, /readyz), the broker ping replaced."""

from __future__ import annotations

from stopright import registry as shutdown_registry

# -- health and readiness -------------------------------------------------------------


def test_healthz_is_ok(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_stays_ok_while_shutting_down(client):
    shutdown_registry.current().begin()

    assert client.get("/healthz").status_code == 200


def test_readyz_is_ready_when_database_and_broker_answer(client, broker_up):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_readyz_is_unavailable_when_the_broker_does_not_answer(client, broker_down):
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reasons": ["broker: no answer"]}


def test_readyz_is_unavailable_while_shutting_down(client, broker_up):
    shutdown_registry.current().shutting_down.set()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reasons": ["shutting down"]}


def test_readyz_names_a_database_failure(client, broker_up, monkeypatch):
    import app.api

    class Unreachable:
        def connect(self):
            raise ConnectionRefusedError("no database")

    monkeypatch.setattr(app.api, "get_engine", lambda: Unreachable())

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["database: ConnectionRefusedError"]


def test_readyz_lists_every_reason(client, broker_down):
    shutdown_registry.current().begin()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["shutting down", "broker: no answer"]


# -- a request racing the shutdown -----------------------------------------------------


def test_readyz_after_the_registry_closed_is_503_not_500(client, monkeypatch):
    # A request racing the shutdown: the redis client was already closed.
    import stopright.registry

    stopright.registry.current().close_all()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert "shutting down" in response.get_json()["reasons"]
