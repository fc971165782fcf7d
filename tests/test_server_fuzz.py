"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends,
valid or not, no answer is a 500 and every answer matches what the schema says of it
(status, content type, body, headers). Runs against a throwaway index of this module's own,
so the state-changing routes (an index run, moving duplicates and undoing it) are fuzzed
too; the model is a tiny random ViT."""

from __future__ import annotations

import pytest
from conftest import draw_image
from hypothesis import HealthCheck, settings

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from simsearch import Index  # noqa: E402
from simsearch.server.app import create_app  # noqa: E402
from simsearch.server.state import Settings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, tiny_vit):
    """An app over an index of 10 images (two of them near-duplicates, a clustering run),
    with a move folder, so duplicates can be moved and undone."""
    base = tmp_path_factory.mktemp("fuzz")
    photos = base / "photos"
    photos.mkdir()
    for i in range(8):
        draw_image(i).save(photos / f"img{i}.png")
    draw_image(0).save(photos / "img0-copy.jpg", quality=90)
    draw_image(3).resize((80, 60)).save(photos / "img3-small.png")
    with Index.create(base / "index", model=tiny_vit) as idx:
        idx.add(photos)
        idx.cluster(2)
    settings_ = Settings(index=base / "index", precision="fp32", move_to=base / "moved", window=0.0)
    app = create_app(settings_)
    app.state.server.load_model()  # the first upload need not wait for it
    yield app
    app.state.server.close()


def _routes_schema() -> dict:
    """The app's OpenAPI document, made without an index (no route is called): the cases
    are generated at collection time, the app they are sent to is the fixture's."""
    from pathlib import Path

    return create_app(Settings(index=Path("unused")), server=object()).openapi()  # type: ignore[arg-type]


# schemathesis.pytest.from_fixture would load it from the fixture, but its lazy loader sets
# pytest's Function._nodeid, which pytest 9 no longer has (AttributeError).
schema = schemathesis.openapi.from_dict(_routes_schema())
checks = schema.config.checks
# Valid by the schema yet refused with 400 (JSON, documented): what a schema cannot say,
# "at least one image, id or vector", "no calibrated threshold", "no clusters yet". A 422
# for schema-valid input still fails.
checks.positive_data_acceptance.expected_statuses = [
    *checks.positive_data_acceptance.expected_statuses,
    "400",
]
# Starlette answers a method a path lacks with the Allow of the first route on that path
# (GET /api/search says "Allow: GET" though POST /api/search exists): the framework's,
# not a property of this API worth failing on.
checks.allow_header_conformance.enabled = False


def map_case(context, case):
    """Multipart has no null: schemathesis sends the text "null" for a nullable field, a
    client leaves the field out, which is what the server takes for null."""
    if case.media_type == "multipart/form-data" and isinstance(case.body, dict):
        case.body = {k: v for k, v in case.body.items() if v is not None}
    return case


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a failure here is reproducible
)
@schema.hooks.apply(map_case)
@schema.parametrize()
def test_no_500_and_every_answer_matches_the_schema(case, fuzzed_app):
    case.call_and_validate(base_url="http://localhost", app=fuzzed_app)
