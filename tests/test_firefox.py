"""The page in headless Firefox (Debian's firefox-esr) against a real server: it loads offline, goes live, trains
with moving status and charts, saves from the save dialog with a green toast and a new row, shows a red toast for a
duplicate name, and holds its layout at 1280x800 and on a narrow window. The tests run in file order and share
one run. tests/test_browser.py covers the page in depth in Chromium; this is the same page in the other engine."""
import json
from pathlib import Path

import pytest

from conftest import LiveServer, build_app

pytestmark = pytest.mark.browser
bidi = pytest.importorskip("firefox_bidi")
if bidi.FIREFOX is None:
    pytest.skip("Firefox is missing (apt-get install -y firefox-esr)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory, arc_data):
    live = LiveServer(build_app(tmp_path_factory.mktemp("firefox") / "checkpoints", arc_data))
    yield live
    live.close()


@pytest.fixture(scope="module")
def firefox(tmp_path_factory, server):
    browser = bidi.Firefox(str(tmp_path_factory.mktemp("firefox-profile")))
    browser.set_viewport(1280, 800)
    browser.goto(server.url)
    yield browser
    browser.close()


def text_of(selector):
    return f"document.querySelector({json.dumps(selector)}).textContent.trim()"


def save_from_dialog(firefox, name):
    """Click Save Checkpoint and answer the page's save dialog with a name (None cancels); what it showed."""
    firefox.click("#save-checkpoint")
    firefox.wait_for("document.getElementById('save-dialog').open", what="the save dialog")
    shown = json.loads(firefox.evaluate("JSON.stringify({message: document.getElementById('save-dialog').innerText,"
                                        " default: document.getElementById('save-name').value})"))
    if name is None:
        firefox.click("#save-cancel")
    else:
        firefox.evaluate("(() => { const field = document.getElementById('save-name');"
                         f" field.value = {json.dumps(name)}; field.dispatchEvent(new Event('input'));"
                         " return true; })()")
        firefox.click("#save-confirm")
    firefox.wait_for("!document.getElementById('save-dialog').open", what="the dialog to close")
    return shown


def test_page_goes_live_with_the_form_and_save_disabled(firefox):
    firefox.wait_for(f"{text_of('#connection')} === 'live'", what="the event stream to connect")
    assert firefox.evaluate("document.querySelectorAll('#cfg-task_type option').length") == 3
    assert firefox.evaluate("document.getElementById('cfg-epochs').value") == "50"  # the server's defaults
    assert firefox.evaluate("document.getElementById('save-checkpoint').disabled") is True
    assert firefox.evaluate("typeof Plotly") == "object"  # served by this server, no CDN
    assert firefox.evaluate(text_of("#save-checkpoint")) == "Save Checkpoint"  # its icon is an SVG
    assert firefox.evaluate(r"/[\p{Emoji_Presentation}\uFE0F]/u.test(document.body.innerText)") is False
    firefox.wait_for("document.getElementById('chart-loss').dataset.empty === 'true'", what="the empty chart")
    assert firefox.evaluate(text_of("#chart-loss .annotation-text")) == "waiting for the first step"


def test_training_moves_status_charts_and_samples(firefox):
    firefox.click("#start-training")
    firefox.wait_for(f"{text_of('#phase-badge')} === 'training'", what="phase training")
    firefox.wait_for("!document.getElementById('save-checkpoint').disabled", what="Save enabled")
    firefox.wait_for("Number(document.querySelector('[data-key=global_step]').textContent.replaceAll(',', '')) >= 2",
                     what="the global step to move")
    firefox.wait_for("(() => { const d = document.getElementById('chart-loss').data;"
                     " return d && d[0].x.length >= 2; })()", what="loss points on the chart")
    assert firefox.evaluate("document.querySelectorAll('#chart-loss svg.main-svg').length") >= 1
    firefox.wait_for("document.querySelectorAll('#samples .sample canvas.grid').length > 0", what="sample grids")


def test_save_from_the_dialog_shows_a_green_toast_and_a_row(firefox):
    shown = save_from_dialog(firefox, "firefox save")
    assert shown["default"] == ""  # an unnamed save is named by the trainer where it is saved
    assert "leave empty: named by its position when saved" in shown["message"]
    assert "Estimated size" in shown["message"]
    firefox.wait_for("[...document.querySelectorAll('.toast.toast-success')]"
                     ".some(t => t.textContent.includes('firefox save'))", what="the green toast")
    run = firefox.evaluate(text_of('#status-list dd[data-key="run_id"]'))
    ident = json.dumps(f"{run}:firefox save")  # rows are found by id, RUN_ID:NAME
    firefox.wait_for(f"document.querySelector(`#checkpoints-table tr[data-id=${{CSS.escape({ident})}}]`) !== null",
                     what="the new row")
    # It sits in the current run's group, on top, under a header that names the run and its lineage.
    group = json.loads(firefox.evaluate(
        "(() => { const g = document.querySelector('#checkpoints-table tbody.run-group');"
        " return JSON.stringify({run: g.dataset.runId, current: !!g.querySelector('.run-current'),"
        " lineage: g.querySelector('.run-lineage').textContent,"
        " rows: [...g.querySelectorAll('tr[data-id]')].map((r) => r.dataset.id)}); })()"))
    assert group["run"] == run and group["current"] and group["lineage"] == "fresh run"
    assert f"{run}:firefox save" in group["rows"]
    href = firefox.evaluate(f"document.querySelector(`tr[data-id=${{CSS.escape({ident})}}] [data-action=download]`)"
                            ".getAttribute('href')")
    assert href == f"/checkpoints/{run}%3Afirefox%20save/download"


def test_duplicate_name_shows_a_red_toast(firefox):
    save_from_dialog(firefox, "firefox save")
    firefox.wait_for("[...document.querySelectorAll('.toast.toast-error')]"
                     ".some(t => t.textContent.includes('already exists'))", what="the red toast")
    # at the bottom right, clear of the status panel
    toast, status = json.loads(firefox.evaluate(
        "JSON.stringify([document.querySelector('.toast.toast-error'), document.querySelector('.status-panel')]"
        ".map((e) => e.getBoundingClientRect()))"))
    assert toast["top"] >= status["bottom"] and toast["bottom"] <= 800, (toast, status)


def test_a_cancelled_dialog_sends_nothing(firefox):
    firefox.evaluate("(() => { window.saveRequests = 0; const send = window.fetch; window.fetch = (...args) => {"
                     " if (String(args[0]).includes('/save_checkpoint')) window.saveRequests++;"
                     " return send(...args); }; return true; })()")
    save_from_dialog(firefox, None)
    assert firefox.evaluate("new Promise(r => setTimeout(() => r(window.saveRequests), 300))") == 0
    save_from_dialog(firefox, "firefox second")  # the counter does see a save that is sent
    firefox.wait_for("window.saveRequests === 1", what="the accepted save to be sent")


def test_layout_holds_wide_and_narrow(firefox):
    ARTIFACTS.mkdir(exist_ok=True)
    firefox.evaluate("document.querySelectorAll('.toast').forEach((toast) => toast.click()), true")
    firefox.screenshot(str(ARTIFACTS / "firefox-page.png"))
    assert firefox.evaluate("document.documentElement.scrollWidth") <= 1280
    firefox.set_viewport(420, 900)
    firefox.evaluate("new Promise(r => setTimeout(() => r(true), 700))")  # one chart redraw
    firefox.screenshot(str(ARTIFACTS / "firefox-page-narrow.png"))
    assert firefox.evaluate("document.documentElement.scrollWidth") <= 420  # nothing sticks out sideways
    firefox.set_viewport(1280, 800)


def test_stop_and_no_script_errors(firefox):
    firefox.click("#stop")
    firefox.wait_for(f"{text_of('#phase-badge')} === 'finished'", what="phase finished")
    assert firefox.evaluate("document.getElementById('save-checkpoint').disabled") is True
    assert firefox.errors() == []
