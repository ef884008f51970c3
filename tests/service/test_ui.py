"""The web page (/ui) over HTTP: sign-in by header or cookie, nothing shown without it, CSRF on actions,
escaping of user strings, the list's filters and sort, curves/figures/trials/compare rendered."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import store
from service.main import create_app
from service.settings import Settings
from service.ui import COOKIE, csrf_token
from tests.service.conftest import AUTH, TOKEN, small_spec
from tests.service.test_api import ctx_of, submit, write_run

EVIL = "<script>alert(1)</script>"


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Any) -> FastAPI:
    return create_app(make_settings(database_url=f"sqlite:///{tmp_path / 'ui.db'}"))


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as c:
        yield c


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A client without the Authorization header: it signs in through the form, as a person does."""
    with TestClient(app, follow_redirects=False) as c:
        yield c


def sign_in(browser: TestClient) -> None:
    r = browser.post("/ui/login", data={"token": TOKEN, "next": "/ui/"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie


def test_without_a_token_no_page_shows_experiment_data(api: TestClient, browser: TestClient) -> None:
    exp = submit(api, small_spec("secret-name"))
    for path in ("/ui/", f"/ui/experiments/{exp['id']}", f"/ui/compare?id={exp['id']}"):
        r = browser.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        shown = re.sub(r'name="next" value="[^"]*"', "", r.text)  # (the page asked for, to return to after)
        assert "secret-name" not in shown and exp["id"] not in shown
        assert 'action="/ui/login"' in r.text  # the sign-in form instead
    bad = browser.post("/ui/login", data={"token": "wrong"})
    assert bad.status_code == 401 and "is not one of the service" in bad.text
    assert "set-cookie" not in bad.headers
    forged = browser.get("/ui/", cookies={COOKIE: "forged"})
    assert forged.status_code == 401


def test_header_or_cookie_signs_in_and_the_list_shows_filters_and_sorts(api: TestClient, browser: TestClient) -> None:
    a, b = submit(api, small_spec("alpha")), submit(api, small_spec("beta", kind="search"))
    with ctx_of(browser.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.update_fields(s, a["id"], result={"miou": 61.25, "pseudo_label_miou": 80.5})
        store.update_fields(s, b["id"], result={"miou": 70.5})
    by_header = api.get("/ui/")
    assert by_header.status_code == 200 and "alpha" in by_header.text and "beta" in by_header.text
    sign_in(browser)
    page = browser.get("/ui/").text
    assert "61.25" in page and "80.50" in page and 'http-equiv="refresh"' in page  # queued rows: it reloads
    assert page.index("beta") < page.index("alpha")  # newest first
    by_miou = browser.get("/ui/?sort=miou").text
    assert by_miou.index("beta") < by_miou.index("alpha")
    only_search = browser.get("/ui/?kind=search").text
    assert "beta" in only_search and "alpha" not in only_search
    assert "alpha" in browser.get("/ui/?name=LPH").text and "beta" not in browser.get("/ui/?name=LPH").text
    assert "no experiment matches" in browser.get("/ui/?status=succeeded").text
    assert browser.get("/ui/?sort=evil").status_code == 422


def test_user_strings_are_escaped(api: TestClient, browser: TestClient, make_settings: Any) -> None:
    exp = submit(api, small_spec("evil-name"))
    with ctx_of(browser.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.update_fields(s, exp["id"], error=EVIL, name=EVIL)
    sign_in(browser)
    for path in ("/ui/", f"/ui/experiments/{exp['id']}", f"/ui/compare?id={exp['id']}"):
        text = browser.get(path).text
        assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path


def test_actions_need_the_csrf_token(api: TestClient, browser: TestClient) -> None:
    exp = submit(api, small_spec("to-cancel"))
    sign_in(browser)
    page = browser.get(f"/ui/experiments/{exp['id']}").text
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert csrf and csrf.group(1) == csrf_token(TOKEN) and 'id="cancel"' in page
    for data in ({}, {"csrf": "0" * 64}):
        assert browser.post(f"/ui/experiments/{exp['id']}/cancel", data=data).status_code == 403
    assert api.get(f"/v1/experiments/{exp['id']}").json()["status"] == "queued"
    r = browser.post(f"/ui/experiments/{exp['id']}/cancel", data={"csrf": csrf.group(1)})
    assert r.status_code == 303 and r.headers["location"] == f"/ui/experiments/{exp['id']}"
    assert api.get(f"/v1/experiments/{exp['id']}").json()["status"] == "cancelled"
    page = browser.get(f"/ui/experiments/{exp['id']}").text
    assert 'id="retry"' in page and 'id="cancel"' not in page
    assert browser.post(f"/ui/experiments/{exp['id']}/retry", data={"csrf": csrf.group(1)}).status_code == 303
    assert api.get(f"/v1/experiments/{exp['id']}").json()["status"] == "queued"
    # Illegal transitions keep the API's answer (409), and a signed-out POST gets the sign-in form.
    with TestClient(browser.app, follow_redirects=False) as stranger:  # type: ignore[arg-type]
        assert stranger.post(f"/ui/experiments/{exp['id']}/cancel", data={"csrf": csrf.group(1)}).status_code == 401
    out = browser.post("/ui/logout", data={"csrf": csrf.group(1)})
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]


def test_the_experiment_page_draws_curves_figures_checkpoints_and_the_spec(api: TestClient) -> None:
    exp = submit(api, small_spec("drawn"))
    files = write_run(exp["run_dir"])
    rows = [
        {"stage": "stage2", "epoch": e, "loss": 2.0 / e, "loss_segs": 1.0 / e, "loss_lorm": 0.1, "miou": 40.0 + e,
         "lr": 0.01 / e, "per_class_iou": [90.0, 50.0 + e, None] if e == 2 else None}
        for e in (1, 2)
    ]  # fmt: skip
    with ctx_of(api.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.sync_metric_rows(s, exp["id"], rows, 0)
    page = api.get(f"/ui/experiments/{exp['id']}").text
    assert page.count("<svg") >= 4  # loss terms, validation, lr, per-class IoU
    assert "stage2: loss terms" in page and "<polyline" in page and "segs" in page and "lorm" in page
    assert "validation IoU per class" in page and "52.0" in page and "n/a" in page
    assert f'src="/ui/experiments/{exp["id"]}/figures/miou.png"' in page
    assert "stage2-epoch002.pt" in page and "name: drawn" in page  # checkpoints and the spec as YAML
    assert "queued" in page and 'id="timeline"' in page
    fig = api.get(f"/ui/experiments/{exp['id']}/figures/miou.png")
    assert fig.status_code == 200 and fig.content == files["figures/miou.png"]
    ckpt = api.get(f"/ui/experiments/{exp['id']}/checkpoints/stage2-epoch002.pt")
    assert ckpt.status_code == 200 and ckpt.content == files["checkpoints/stage2-epoch002.pt"]
    assert "attachment" in ckpt.headers["content-disposition"]
    for bad in ("..%2F..%2Fspec.yaml", "%2Fetc%2Fhostname", "x%00.pt"):
        assert api.get(f"/ui/experiments/{exp['id']}/checkpoints/{bad}").status_code in (404, 422)
    assert api.get("/ui/experiments/exp-000000000000").status_code == 404


def test_a_search_shows_its_trials_best_marked_and_the_lambda_heatmap(api: TestClient) -> None:
    exp = submit(api, small_spec("grid", kind="search"))
    trials = [
        {"trial": f"t{i}", "params": {"stage2.lambda_s": ls, "stage2.lambda_c": lc}, "miou": m, "status": "TERMINATED"}
        for i, (ls, lc, m) in enumerate([(1.0, 6.0, 50.0), (2.0, 6.0, 61.5), (1.0, 8.0, 58.0)])
    ]
    with ctx_of(api.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.update_fields(s, exp["id"], trials=trials)
    page = api.get(f"/ui/experiments/{exp['id']}").text
    assert "mIoU over lambda_s x lambda_c" in page and "61.5" in page
    assert re.search(r'<tr class="best"><td>t1 \(best\)', page)
    assert page.count('stroke="#000"') == 1  # one outlined best cell


def test_compare_overlays_curves_and_diffs_the_specs(api: TestClient) -> None:
    a, b = submit(api, small_spec("one", epochs=2)), submit(api, small_spec("two", epochs=3))
    with ctx_of(api.app).sessions.begin() as s:  # type: ignore[attr-defined]
        for exp, base in ((a, 40.0), (b, 45.0)):
            store.sync_metric_rows(s, exp["id"], [{"stage": "stage2", "epoch": 1, "miou": base, "loss": 1.0}], 0)
    page = api.get(f"/ui/compare?id={a['id']}&id={b['id']}").text
    assert page.count("<polyline") >= 2 or page.count("<circle") >= 2
    diff = page[page.index('id="differences"') :]
    assert "stage1.epochs" in diff and "stage2.epochs" in diff and "name" in diff
    assert "data.num_classes" not in diff  # equal values are not listed


def test_odd_results_trials_and_searches_render(api: TestClient) -> None:
    """A result whose trivial-label figure is null (no ground truth) renders (it was a 500); a trial's
    epoch shows; a `mode: min` search outlines its lowest cell; compare ignores a search's trial rows."""
    plain = submit(api, small_spec("no-truth"))
    search = submit(api, {**small_spec("lowest", kind="search"), "search": {
        "space": {"stage2.lambda_s": {"grid": [1.0, 2.0]}}, "mode": "min"}})  # fmt: skip
    trials = [{"trial": f"t{i}", "params": {"stage2.lambda_s": ls, "stage2.lambda_c": 6.0}, "miou": m,
               "status": "finished", "epoch": 7} for i, (ls, m) in enumerate([(1.0, 50.0), (2.0, 40.0)])]  # fmt: skip
    with ctx_of(api.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.update_fields(s, plain["id"], result={"miou": 50.0, "trivial_label_miou": None})
        store.update_fields(s, search["id"], trials=trials)
        rows = [
            {"stage": "stage2", "epoch": 1, "miou": 30.0},
            {"stage": "stage2", "epoch": 5, "miou": 90.0, "trial": "t0"},
        ]
        store.sync_metric_rows(s, search["id"], rows, 0)
    page = api.get(f"/ui/experiments/{plain['id']}")
    assert page.status_code == 200 and "val mIoU 50.00" in page.text and "trivial label" not in page.text
    found = api.get(f"/ui/experiments/{search['id']}").text
    assert re.search(r'<td class="num">7</td>', found)
    best = re.search(r'<rect[^>]*stroke="#000"[^>]*>', found)
    assert best is not None and found.count('stroke="#000"') == 1
    assert re.search(r'class="best"><td>t1 \(best\)', found)  # the lower mIoU wins with mode: min
    compared = api.get(f"/ui/compare?id={plain['id']}&id={search['id']}").text
    chart = compared[compared.index("stage 2: validation mIoU") :].split("</svg>")[0]
    assert chart.count("<circle") == 1 and chart.count("<polyline") == 1  # the search's own one epoch


def test_the_list_reload_can_be_paused_and_sign_in_returns_to_the_page_with_its_query(
    api: TestClient, browser: TestClient
) -> None:
    a, b = submit(api, small_spec("a")), submit(api, small_spec("b"))  # queued: the list reloads
    first = browser.get(f"/ui/compare?id={a['id']}&id={b['id']}")
    assert f'value="/ui/compare?id={a["id"]}&amp;id={b["id"]}"' in first.text  # sign in, then back to both ids
    sign_in(browser)
    live = browser.get("/ui/?kind=pipeline").text
    assert 'http-equiv="refresh"' in live and 'href="/ui/?kind=pipeline&amp;live=0"' in live
    paused = browser.get("/ui/?kind=pipeline&live=0").text
    assert 'http-equiv="refresh"' not in paused and "reloading paused" in paused
    assert '<input type="hidden" name="live" value="0">' in paused  # the filter form keeps it paused


def test_the_list_pages_and_its_name_filter_reaches_every_experiment(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of LIST_PAGE rows with links both ways; the name filter runs in the database, so old
    matches are found (it used to look at the newest 500 only), and `_` matches itself only."""
    import service.ui as ui

    monkeypatch.setattr(ui, "LIST_PAGE", 2)
    ids = [submit(api, small_spec(name))["id"] for name in ("old_match", "oldXmatch", "b", "c", "d")]
    first = api.get("/ui/").text
    assert "1-2 of 5" in first and 'id="next"' in first and 'id="previous"' not in first
    assert ids[4] in first and ids[3] in first and ids[2] not in first  # newest first
    last = api.get("/ui/?page=3").text
    assert "5-5 of 5" in last and ids[0] in last and 'id="previous"' in last and 'id="next"' not in last
    found = api.get("/ui/?name=OLD_").text
    assert "1-1 of 1" in found and ids[0] in found and ids[1] not in found
    by_miou = api.get("/ui/?sort=miou&page=2").text
    assert "3-4 of 5" in by_miou
    beyond = api.get("/ui/?page=9").text  # past the last page: back to the last one, not to page 8
    assert "none of 5" in beyond and 'href="/ui/?page=3"' in beyond and 'id="next"' not in beyond
    monkeypatch.setattr(ui, "SORT_LIMIT", 3)  # the mIoU sort pages what it read, no further
    read = api.get("/ui/?sort=miou&page=2").text
    assert "3-3 of 3" in read and 'id="next"' not in read


def test_a_running_experiments_page_shows_the_run_folders_copy_of_its_log(api: TestClient) -> None:
    """The page reads the copy the control loop keeps (here Ray does not even answer), not Ray's
    whole log on every reload."""
    from cdsp_core import runs
    from service.runfolder import log_location
    from service.states import Status

    exp = submit(api, small_spec("logged"))
    with ctx_of(api.app).sessions.begin() as s:  # type: ignore[attr-defined]
        store.transition(s, exp["id"], Status.dispatching, "claimed", "test", submission_id=exp["id"])
        store.transition(s, exp["id"], Status.running, "running", "test")
    runs.write_text(log_location(exp["run_dir"], exp["id"]), "stage2 epoch 3/8 | loss 0.5\n")
    page = api.get(f"/ui/experiments/{exp['id']}").text
    assert "stage2 epoch 3/8 | loss 0.5" in page


def test_errors_on_the_web_page_are_pages_and_the_api_keeps_json(api: TestClient, browser: TestClient) -> None:
    sign_in(browser)
    cases = {
        "/ui/experiments/exp-000000000000": (404, "exp-000000000000"),
        "/ui/?status=bogus": (422, "status"),
        "/ui/compare?id=exp-000000000000": (404, "exp-000000000000"),
    }
    for path, (code, named) in cases.items():
        r = browser.get(path)
        assert r.status_code == code and r.headers["content-type"].startswith("text/html"), (path, r.text[:200])
        message = re.search(r'id="message">([^<]*)<', r.text)
        assert message and named in message.group(1) and "back to the experiments" in r.text, r.text[-600:]
    exp = submit(api, small_spec("forged"))
    forged = browser.post(f"/ui/experiments/{exp['id']}/cancel", data={"csrf": "0" * 64})
    assert (
        forged.status_code == 403 and "CSRF" in forged.text and forged.headers["content-type"].startswith("text/html")
    )
    assert api.get("/v1/experiments/exp-000000000000").json()["detail"]  # the API: still JSON
    assert api.get("/v1/experiments?status=bogus").json()["detail"][0]["field"] == "status.0"
