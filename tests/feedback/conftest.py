import pytest

pytest.importorskip("sqlalchemy", reason="the feedback tests need the `web` extra: pip install -e '.[web]'")

from rlhfkit.feedback import service as service_mod  # noqa: E402
from rlhfkit.feedback.service import FeedbackService  # noqa: E402
from rlhfkit.feedback.store import open_store  # noqa: E402


@pytest.fixture(autouse=True)
def fast_hashing(monkeypatch):
    """OWASP-strength scrypt takes ~0.3 s per hash; tests check behaviour, not cost (the cost is in each hash)."""
    monkeypatch.setattr(service_mod, "SCRYPT_N", 2**10)


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "feedback.db"))
    yield s
    s.close()


@pytest.fixture
def svc(store):
    import random

    return FeedbackService(store, rng=random.Random(0))


@pytest.fixture
def app(svc, tmp_path):
    """The labelling app over a populated store (web_helpers.populate), its ids in app.state.ids."""
    from rlhfkit.feedback.web.app import create_app, load_or_create_secret

    from .web_helpers import populate

    ids = populate(svc)
    application = create_app(svc, load_or_create_secret(tmp_path / "secret_key"), rate_limit=1000)
    application.state.ids = ids
    return application
