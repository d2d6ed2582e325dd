"""The page in headless Chromium against a real server: form, run controls, live status and charts, samples,
saving, the checkpoints table grouped by run (compare, delete, resume, by checkpoint id RUN_ID:NAME). One server
and one browser for the module; the tests run in file order and share the run they start."""
import contextlib
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TINY_TRAIN = dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2, batch_size=8, epochs=50,
                  device="cpu", checkpoint_every_epochs=0)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 30_000  # the machine may be busy: training steps can take a second

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
expect.set_options(timeout=WAIT_MS)


@contextlib.contextmanager
def serve(folder, data, **config):
    """The app with tiny training defaults on a free loopback port; yields its URL."""
    from werkzeug.serving import make_server

    from app import create_app
    app = create_app({"CHECKPOINT_DIR": str(folder), "TRAIN_DEFAULTS": dict(TINY_TRAIN), "DATA": data, **config})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        app.extensions["trainer"].shutdown()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, arc_data):
    with serve(tmp_path_factory.mktemp("browser") / "checkpoints", arc_data) as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """The Playwright page plus what it logged: console errors, page errors, and requests sent."""

    def __init__(self, page):
        self.page, self.console_errors, self.page_errors, self.posts = page, [], [], []
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.requests = []
        page.on("request", self._log_request)

    def _log_request(self, request):
        if request.method != "GET":
            self.requests.append(request)
            self.posts.append((request.method, request.url, request.post_data))


def open_page(chromium, url):
    page = chromium.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(WAIT_MS)
    wrapped = Page(page)
    page.goto(url)
    expect(page.locator("#connection")).to_have_text("live")
    return wrapped


@pytest.fixture(scope="module")
def ui(chromium, server_url):
    wrapped = open_page(chromium, server_url)
    yield wrapped
    wrapped.page.close()


def phase(page):
    return page.locator("#phase-badge")


def status_value(page, key):
    return page.locator(f'#status-list dd[data-key="{key}"]')


def current_run(page):
    """The run the status panel shows (status.run_id)."""
    return status_value(page, "run_id").text_content()


def row(page, ident):
    """A checkpoint's row, found by its id RUN_ID:NAME."""
    return page.locator(f'#checkpoints-table tr[data-id="{ident}"]')


def group_ids(page):
    """The run ids of the table's groups, top to bottom."""
    return page.eval_on_selector_all("#checkpoints-table tbody.run-group", "bs => bs.map((b) => b.dataset.runId)")


def group(page, run_id):
    return page.locator(f'#checkpoints-table tbody.run-group[data-run-id="{run_id}"]')


def encoded(ident):
    """What encodeURIComponent makes of an id: the colon and spaces escaped."""
    return quote(ident, safe="")


def wait_until_stopped(page):
    expect(phase(page)).to_have_text("finished")
    expect(page.locator("#start-training")).to_be_enabled()


def save_via_prompt(ui, answer, contents=None, compression=None):
    """Click Save Checkpoint and answer its dialog (a name, or None to cancel; contents and compression picked when
    given); returns the dialog's text, its name field's starting value and its estimate as they were first shown."""
    page = ui.page
    page.click("#save-checkpoint")
    dialog = page.locator("#save-dialog")
    expect(dialog).to_be_visible()
    seen = {"type": "dialog", "message": dialog.inner_text(), "default": page.input_value("#save-name"),
            "estimate": page.locator("#save-estimate").text_content()}
    if answer is None:
        page.click("#save-cancel")
    else:
        page.fill("#save-name", answer)
        if contents is not None:
            page.select_option("#save-contents", contents)
        if compression is not None:
            page.select_option("#save-compression", compression)
        seen["chosen_estimate"] = page.locator("#save-estimate").text_content()
        page.click("#save-confirm")
    expect(dialog).to_be_hidden()
    expect(page.locator("#save-checkpoint")).to_be_enabled()  # the page is responsive again
    return seen


def box(page, selector):
    """An element's getBoundingClientRect() as a dict (x, y, width, height, top, right, bottom, left)."""
    return page.eval_on_selector(selector, "e => e.getBoundingClientRect().toJSON()")


def overlaps(a, b):
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def shows(shown, value):
    """Whether a form input's value (a string, or a checkbox's bool) shows a config value."""
    if isinstance(value, bool) or isinstance(shown, bool):
        return shown is value
    if isinstance(value, (int, float)):
        return float(shown) == value
    return shown == ("" if value is None else str(value))


def form_values(page):
    """The config form's inputs by name: strings, and bools for checkboxes."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#config-form [name]')]
        .map((i) => [i.name, i.type === 'checkbox' ? i.checked : i.value]))""")


def charts_fit(page):
    """Wait until Plotly has redrawn the charts for the window's width (it resizes them itself)."""
    page.wait_for_function("""() => [...document.querySelectorAll('.chart')].every((c) => {
        const svg = c.querySelector('svg.main-svg');
        return svg && Math.abs(Number(svg.getAttribute('width')) - c.clientWidth) <= 1; })""")


def fetch_json(page, url):
    """GET url from the page (with its cookie), as the page's own scripts would."""
    return page.evaluate("url => fetch(url).then((r) => r.json())", url)


# A name cell's line ends: for each line after the first, the character the line before it ended with.
NAME_LINE_ENDS = """cells => cells.map((cell) => {
    const chars = [];
    for (const node of cell.childNodes) {
        if (node.nodeType !== Node.TEXT_NODE) continue;
        for (let i = 0; i < node.length; i += 1) {
            const range = document.createRange();
            range.setStart(node, i);
            range.setEnd(node, i + 1);
            const rect = range.getClientRects()[0];
            if (rect && rect.width > 0) chars.push([node.data[i], rect.top]);
        }
    }
    const ends = chars.filter((c, i) => i + 1 < chars.length && chars[i + 1][1] > c[1] + 2).map((c) => c[0]);
    return {name: cell.closest('tr').dataset.name, ends};
})"""

# Text that a browser without emoji fonts draws as a box: anything shown as an emoji by default.
EMOJI = r"/[\p{Emoji_Presentation}\uFE0F]/u"


def test_form_is_built_from_config(ui):
    page = ui.page
    expect(page.locator("#cfg-task_type option")).to_have_count(3)
    assert page.locator("#cfg-use_input_output_pairs").get_attribute("type") == "checkbox"
    epochs = page.locator("#cfg-epochs")
    assert epochs.get_attribute("type") == "number" and epochs.get_attribute("min") == "1"
    assert epochs.input_value() == "50"  # the server's defaults, not the dataclass's
    assert page.locator("#advanced #cfg-seed").count() == 1
    expect(page.locator("#advanced #cfg-seed")).to_be_hidden()  # inside the closed Advanced section
    expect(page.locator("#cfg-pretrained_encoder option")).to_have_text(["none"])
    expect(page.locator("#save-checkpoint")).to_be_disabled()  # idle
    expect(page.locator("#stop")).to_be_disabled()


def test_no_emoji_and_empty_charts_wait_for_the_first_step(ui):
    page = ui.page
    save = page.locator("#save-checkpoint")
    expect(save).to_have_text("Save Checkpoint")  # the icon is an SVG, not a character
    icon = box(page, "#save-checkpoint svg.icon")
    assert icon["width"] >= 12 and icon["height"] >= 12
    text = page.evaluate("() => document.body.innerText + document.title")
    assert page.evaluate(f"t => {EMOJI}.test(t)", text) is False, text
    assert page.evaluate(f"() => {EMOJI}.test('💾')")  # the pattern does catch the old icon
    # No run yet: each chart says so, instead of drawing a made-up axis whose labels collide.
    for chart in ("#chart-loss", "#chart-acc", "#chart-temperature"):
        expect(page.locator(chart)).to_have_attribute("data-empty", "true")
        expect(page.locator(f"{chart} .annotation-text")).to_have_text("waiting for the first step")
        assert page.locator(f"{chart} .xtick, {chart} .ytick").count() == 0


def test_preset_menu_fills_the_form(chromium, server_url):
    presets = None
    wrapped = open_page(chromium, server_url)  # a page of its own: the shared one keeps the form the tests set
    page = wrapped.page
    try:
        config = fetch_json(page, "/config")
        presets = config.get("presets")
        if not presets:
            expect(page.locator("#presets")).to_be_hidden()  # no menu without presets
            pytest.skip("server has no presets yet")
        expect(page.locator("#preset option")).to_have_count(len(presets) + 1)
        preset = presets[0]
        page.select_option("#preset", preset["name"])
        expect(page.locator("#preset-description")).to_have_text(preset.get("description") or "")
        form = form_values(page)
        expected = {**config["defaults"], **preset["values"]}  # the fields it names; the others as defaults
        wrong = {name: (form[name], value) for name, value in expected.items()
                 if name in form and name != "checkpoint_dir" and not shows(form[name], value)}
        assert wrong == {}
        assert wrapped.page_errors == []
    finally:
        page.close()


def test_bad_field_shows_the_servers_error(ui):
    page = ui.page
    page.fill("#cfg-batch_size", "0")
    page.click("#start-training")
    toast = page.locator(".toast.toast-error", has_text="batch_size")
    expect(toast).to_be_visible()
    # Toasts sit at the bottom right, clear of the status panel at the top right.
    for width, height in ((1280, 800), (1440, 900)):
        page.set_viewport_size({"width": width, "height": height})
        shown, status = box(page, ".toast.toast-error"), box(page, ".status-panel")
        assert not overlaps(shown, status), (shown, status)
        assert shown["bottom"] <= height and shown["right"] <= width
    page.set_viewport_size({"width": 1280, "height": 800})
    page.fill("#cfg-batch_size", "8")
    expect(phase(page)).to_have_text("idle")
    ui.first_error_toast = toast.element_handle()


def test_save_button_disabled_during_pretraining(ui):
    page = ui.page
    page.select_option("#cfg-pretrain_mode", "selection")
    page.click("#start-pretraining")
    expect(phase(page)).to_have_text("pretraining")
    ui.pretraining_run = current_run(page)
    body = next(b for m, u, b in ui.posts if u.endswith("/start_pretraining"))
    assert '"mode":"selection"' in body and "checkpoint_dir" not in body
    expect(status_value(page, "mode")).to_have_text("selection")
    expect(page.locator("#save-checkpoint")).to_be_disabled()
    expect(page.locator("#start-training")).to_be_disabled()
    page.wait_for_function("() => document.getElementById('chart-loss').data[0].x.length >= 1")
    expect(page.locator("#save-checkpoint")).to_be_disabled()
    page.click("#stop")
    wait_until_stopped(page)
    expect(page.locator("#save-checkpoint")).to_be_disabled()  # finished


def test_training_shows_status_chart_and_samples(ui):
    page = ui.page
    page.fill("#cfg-learning_rate", "0.002")  # not the default: a reload should show the run's settings
    page.click("#start-training")
    expect(phase(page)).to_have_text("training")
    expect(page.locator("#save-checkpoint")).to_be_enabled()
    page.wait_for_function("() => Number(document.querySelector('[data-key=global_step]').textContent"
                           ".replaceAll(',', '')) >= 2")
    page.wait_for_function("() => { const d = document.getElementById('chart-loss').data;"
                           " return d && d[0].x.length >= 2 && d[1].y.length >= 2; }")
    expect(page.locator("#status-batch")).to_contain_text("/")
    expect(page.locator("#samples .sample canvas.grid").first).to_be_visible()
    expect(page.locator("#samples .message .token").first).to_be_visible()  # communication by default
    # The default cell code is drawn between each grid and its reconstruction: one symbol per 2x2 block.
    expect(page.locator("#samples .cell-message canvas.grid").first).to_be_visible()
    sides = page.evaluate("""() => [...document.querySelector('#samples .pair').querySelectorAll('canvas.grid')]
                             .slice(0, 2).map((c) => [Number(c.dataset.rows), Number(c.dataset.cols)])""")
    grid, cells = sides
    assert cells == [(grid[0] + 1) // 2, (grid[1] + 1) // 2], sides
    page.wait_for_function("e => !e.isConnected", arg=ui.first_error_toast)  # toasts dismiss themselves


def test_pause_and_resume(ui):
    page = ui.page
    page.click("#pause-resume")
    expect(phase(page)).to_have_text("training · paused")
    expect(page.locator("#pause-resume")).to_have_text("Resume")
    expect(page.locator("#save-checkpoint")).to_be_enabled()  # a paused run can still be saved
    page.click("#pause-resume")
    expect(phase(page)).to_have_text("training")
    expect(page.locator("#pause-resume")).to_have_text("Pause")


def test_save_checkpoint_from_the_prompt(ui):
    page = ui.page
    seen = save_via_prompt(ui, "my save")
    assert seen["type"] == "dialog"
    assert seen["default"] == ""  # no guessed name: the trainer names an unnamed save where it saves it
    assert "leave empty: named by its position when saved (checkpoint_epoch_E_batch_B" in seen["message"]
    assert "Estimated size: about" in seen["message"] and "free disk space" in seen["message"]
    expect(page.locator(".toast.toast-success", has_text="my save")).to_be_visible()
    ui.training_run = current_run(page)
    saved = row(page, f"{ui.training_run}:my save")
    expect(saved).to_be_visible()
    expect(saved).to_have_attribute("data-name", "my save")
    expect(saved.locator("td").nth(3)).to_have_text("manual")
    first = page.locator("#checkpoints-table tbody.run-group").first  # the current run's group, on top
    expect(first).to_have_attribute("data-run-id", ui.training_run)
    expect(first.locator(".run-header .run-current")).to_have_text("current")
    expect(first.locator(".run-header .run-lineage")).to_have_text("fresh run")
    expect(first.locator(".run-header .run-what")).to_have_text("reconstruction/communication")
    assert first.locator(f'tr[data-id="{ui.training_run}:my save"]').count() == 1


def test_duplicate_name_shows_red_toast(ui):
    page = ui.page
    save_via_prompt(ui, "my save")
    expect(page.locator(".toast.toast-error", has_text="already exists")).to_be_visible()


def test_cancelled_prompt_sends_nothing(ui):
    before = sum(u.endswith("/save_checkpoint") for _, u, _ in ui.posts)
    save_via_prompt(ui, None)
    ui.page.wait_for_timeout(300)
    assert sum(u.endswith("/save_checkpoint") for _, u, _ in ui.posts) == before


def test_an_unnamed_save_is_named_where_it_is_saved(ui):
    page = ui.page
    save_via_prompt(ui, "")
    toast = page.locator(".toast.toast-success", has_text="Saved “checkpoint_epoch_")
    expect(toast).to_be_visible()
    assert [b for _, u, b in ui.posts if u.endswith("/save_checkpoint")][-1] == "{}"  # no name sent
    saved = re.search(r"Saved “(checkpoint_epoch_(\d+)_batch_(\d+)\S*)”.*\(epoch (\d+), batch (\d+)",
                      toast.text_content())
    name, epoch, batch = saved.group(1), saved.group(4), saved.group(5)
    assert (saved.group(2), saved.group(3)) == (epoch, batch)  # E epochs done, B batches into the next
    ui.unnamed_save = name
    saved_row = row(page, f"{ui.training_run}:{name}")
    expect(saved_row.locator('td[data-label="epoch"]')).to_have_text(epoch)  # the table says the same
    expect(saved_row.locator('td[data-label="batch"]')).to_have_text(batch)


def test_a_save_that_would_not_fit_is_refused_up_front(ui, monkeypatch):
    import types

    import worker
    almost_full = types.SimpleNamespace(disk_usage=lambda path: types.SimpleNamespace(free=1000))
    monkeypatch.setattr(worker, "shutil", almost_full)  # the status the page reads now says 1 kB free
    page = ui.page
    expect(page.locator("#save-checkpoint")).to_have_attribute("title", re.compile(r", 1000 B free$"))
    before = sum(u.endswith("/save_checkpoint") for _, u, _ in ui.posts)
    page.click("#save-checkpoint")
    expect(page.locator(".toast.toast-error", has_text="Not enough disk space")).to_be_visible()
    page.wait_for_timeout(300)
    expect(page.locator("#save-dialog")).to_be_hidden()  # refused before the dialog opens
    assert sum(u.endswith("/save_checkpoint") for _, u, _ in ui.posts) == before
    monkeypatch.undo()  # the next tests save again: wait until the page has heard of the real free space
    expect(page.locator("#save-checkpoint")).not_to_have_attribute("title", re.compile(r", 1000 B free$"))


def test_a_weights_only_compressed_save_from_the_dialog_is_listed_as_such(ui):
    page = ui.page
    seen = save_via_prompt(ui, "archive", contents="weights", compression="zstd")
    assert seen["estimate"].startswith("Estimated size: about")
    assert seen["chosen_estimate"].startswith("Estimated size: at most")  # zstd's ratio is known only after
    status = fetch_json(page, "/status")
    assert seen["chosen_estimate"] != seen["estimate"] and \
        status["checkpoint_estimates"]["weights"] < status["checkpoint_estimates"]["full"]
    sent = [b for _, u, b in ui.posts if u.endswith("/save_checkpoint")][-1]
    assert json.loads(sent) == {"name": "archive", "contents": "weights", "compression": "zstd"}
    expect(page.locator(".toast.toast-success", has_text="archive")).to_be_visible()
    saved = row(page, f"{ui.training_run}:archive")
    expect(saved.locator(".stored-as")).to_have_text(" weights · zstd")
    expect(saved.locator('[data-action="download"]')).to_have_attribute("download", "archive.pth.zst")
    expect(saved.locator('[data-action="resume"]')).to_have_count(0)  # weights only: not resumable
    expect(saved.locator('[data-action="fine-tune"]')).to_have_count(1)


def test_compare_two_checkpoints(ui):
    page = ui.page
    save_via_prompt(ui, "other save")
    a, b = f"{ui.training_run}:my save", f"{ui.training_run}:other save"
    expect(row(page, b)).to_be_visible()
    page.check(f'input[name="compare-a"][value="{a}"]')
    page.check(f'input[name="compare-b"][value="{b}"]')
    # room below the page, so scrolling to the result can put it at the very top (under the bar, were it not kept
    # clear), wherever the page ends
    page.evaluate("() => { document.body.style.paddingBottom = '2000px'; }")
    with page.expect_response(lambda r: "/compare?" in r.url) as response:
        page.click("#compare")
    assert response.value.url.endswith(f"/compare?a={encoded(a)}&b={encoded(b)}")
    result = page.locator("#compare-result")
    expect(result.locator("h3")).to_have_text(re.compile(rf"^A: {re.escape(a)}\s+↔\s+B: {re.escape(b)}$"))
    expect(result.locator("table.compare-params")).to_contain_text("parameters")
    expect(result.locator("table.compare-metrics tbody tr").first).to_be_visible()
    assert result.locator("table.compare-tensors tbody tr").count() > 3
    # It is scrolled to, its header just below the sticky top bar rather than under it, and it uses the width.
    page.wait_for_function("""() => {
        const top = document.querySelector('#compare-result h3').getBoundingClientRect().top;
        return top >= document.querySelector('.topbar').getBoundingClientRect().bottom && top < innerHeight / 2; }""")
    shown, tensors = box(page, "#compare-result"), box(page, "#compare-result table.compare-tensors")
    assert shown["width"] >= 1280 - 80 and tensors["width"] >= shown["width"] - 2, (shown, tensors)
    metrics, differ = box(page, "#compare-result table.compare-metrics"), box(page, ".compare-grid > div:last-child")
    assert metrics["right"] <= differ["left"] and metrics["top"] < differ["bottom"]  # side by side
    page.evaluate("() => { document.body.style.paddingBottom = ''; }")


def test_verify_and_download_from_a_row(ui):
    page = ui.page
    ident = f"{ui.training_run}:my save"
    saved = row(page, ident)
    with page.expect_response(lambda r: r.url.endswith("/verify")) as response:
        saved.locator('[data-action="verify"]').click()
    assert response.value.url.endswith(f"/checkpoints/{encoded(ident)}/verify")
    expect(page.locator(".toast.toast-success", has_text="verified")).to_be_visible()
    expect(saved.locator(".verified")).to_have_text("✓")
    href = saved.locator('[data-action="download"]').get_attribute("href")
    assert href == f"/checkpoints/{ui.training_run}%3Amy%20save/download" == f"/checkpoints/{encoded(ident)}/download"
    with page.expect_download() as download:
        saved.locator('[data-action="download"]').click()
    assert download.value.suggested_filename == "my save.pth"
    assert os.path.getsize(download.value.path()) > 1000


def test_copy_the_resume_command_of_a_row(ui):
    page = ui.page
    ident = f"{ui.training_run}:my save"
    listed = next(c for c in fetch_json(page, "/list_checkpoints")["checkpoints"] if c["id"] == ident)
    command = listed["resume_command"]
    assert command and "--resume" in command
    row(page, ident).locator('[data-action="copy-command"]').click()
    toast = page.locator(f'.toast[data-command="{command}"]')  # copied or not, the toast shows the command
    expect(toast).to_contain_text(command)
    expect(toast).to_contain_text(ident)


def test_checkpoint_table_names_break_at_underscores_and_actions_stay_on_one_line(ui):
    page = ui.page
    expect(row(page, f"{ui.training_run}:{ui.unnamed_save}")).to_be_visible()
    for width, height in ((1280, 800), (1440, 900), (800, 900), (420, 900)):
        page.set_viewport_size({"width": width, "height": height})
        charts_fit(page)
        lines = page.eval_on_selector_all("#checkpoints-table td.name", NAME_LINE_ENDS)
        assert lines and all(set(n["ends"]) <= {"_", " "} for n in lines), (width, lines)  # never mid-word
        if width == 800:  # the table is narrow here: some name must wrap, so the check above has something to see
            assert any(n["ends"] for n in lines), lines
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
        wrap = page.eval_on_selector(".checkpoints-panel .table-wrap", "w => [w.scrollWidth, w.clientWidth]")
        assert wrap[0] <= wrap[1], (width, wrap)  # the table fits: no sideways scrolling
        if width >= 1280:
            tops = page.eval_on_selector_all("#checkpoints-table .action-buttons", """rows => rows.map((r) =>
                new Set([...r.children].map((b) => Math.round(b.getBoundingClientRect().top))).size)""")
            assert tops and set(tops) == {1}, (width, tops)  # each row's buttons on one line
            # No gap under the curves, however much the samples panel holds: it scrolls inside instead. (measured
            # in one turn of the page: a samples event would replace the copies)
            shown = page.evaluate("""() => {
                const samples = document.getElementById('samples');
                const copies = [...samples.children].flatMap((c) => [1, 2, 3, 4].map(() => c.cloneNode(true)));
                samples.append(...copies);
                const box = (s) => document.querySelector(s).getBoundingClientRect().toJSON();
                const panel = document.querySelector('.samples-panel');
                // under the curves: the language panel once the run has validated (it sends a message), else
                // the checkpoints
                const below = document.getElementById('language-panel').hidden ? '.checkpoints-panel'
                    : '.language-panel';
                const shown = {curves: box('.charts-panel'), samples: box('.samples-panel'),
                               config: box('.config-panel'), listing: box(below),
                               scrolls: panel.scrollHeight > panel.clientHeight};
                copies.forEach((c) => c.remove());
                return shown; }""")
            assert shown["listing"]["top"] - shown["curves"]["bottom"] <= 13, shown
            assert shown["samples"]["bottom"] <= shown["curves"]["bottom"] + 1 and shown["scrolls"], shown
            assert abs(shown["config"]["bottom"] - shown["curves"]["bottom"]) <= 1, shown  # the columns end together
    page.set_viewport_size({"width": 1280, "height": 800})


def test_overlay_run_adds_curves(ui):
    page = ui.page
    options = page.locator("#overlay-run option")
    expect(options).to_have_count(3)  # none, the pretraining run, this run
    # Told apart by start time, the end of the id, what they trained and their best score ("–" before the first
    # validation, which a slow machine may reach by now)
    labels = options.evaluate_all("os => os.slice(1).map((o) => [o.value, o.title, o.textContent])")
    assert [title for _, title, _ in labels] == [ui.training_run, ui.pretraining_run]
    for run_id, _, text in labels:
        assert re.fullmatch(r"\w{3} \d+, \d\d:\d\d:\d\d · " + run_id[-6:] + r" · .+ · best (–|val loss \S+.*)",
                            text), text
    assert "reconstruction/communication" in labels[0][2] and "pretrain selection" in labels[1][2]
    page.locator(".charts").scroll_into_view_if_needed()  # charts off screen wait to be redrawn until seen
    page.select_option("#overlay-run", index=2)  # the older run (pretraining): runs are listed newest first
    page.wait_for_function("() => { const d = document.getElementById('chart-loss').data;"
                           " return d.length === 5 && d[3].x.length >= 1; }")


def test_screenshots(ui):
    page = ui.page
    ARTIFACTS.mkdir(exist_ok=True)
    page.click("#compare-result .close")
    # a click dismisses a toast; the screenshots should show the page under them
    page.evaluate("() => document.querySelectorAll('.toast').forEach((toast) => toast.click())")
    expect(page.locator(".toast")).to_have_count(0)
    page.evaluate("() => window.scrollTo(0, 0)")
    for width, height, name in ((1280, 800, "page.png"), (1440, 900, "page-1440.png"), (420, 900, "page-narrow.png")):
        page.set_viewport_size({"width": width, "height": height})
        charts_fit(page)
        page.screenshot(path=str(ARTIFACTS / name), full_page=True)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width  # nothing sticks out sideways
    page.set_viewport_size({"width": 1280, "height": 800})


def test_delete_asks_first(ui):
    page = ui.page
    ident = f"{ui.training_run}:other save"
    doomed = row(page, ident)
    page.once("dialog", lambda d: d.dismiss())
    doomed.locator('[data-action="delete"]').click()
    page.wait_for_timeout(300)
    expect(doomed).to_be_visible()
    page.once("dialog", lambda d: d.accept())
    doomed.locator('[data-action="delete"]').click()
    expect(doomed).to_have_count(0)
    expect(page.locator(".toast.toast-info", has_text="deleted by the user")).to_be_visible()
    assert ("DELETE", f"/checkpoints/{encoded(ident)}") in [(m, u[u.index("/checkpoints/"):]) for m, u, _ in ui.posts
                                                             if "/checkpoints/" in u]


def test_resume_from_a_row(ui):
    page = ui.page
    run_before = current_run(page)
    page.click("#stop")
    wait_until_stopped(page)
    # The run left a checkpoint where it stopped: the status panel says where, with the command that resumes it.
    final = page.locator("#final-checkpoint")
    expect(final).to_be_visible()
    final_id = final.get_attribute("data-id")
    listed = next(c for c in fetch_json(page, "/list_checkpoints")["checkpoints"] if c["id"] == final_id)
    expect(final.locator(".final-path")).to_have_text(listed["path"])
    expect(final.locator(".final-command")).to_have_text(listed["resume_command"])
    final.locator("button[data-command]").click()
    expect(page.locator(".toast[data-command]", has_text=listed["resume_command"])).to_be_visible()
    ident = f"{run_before}:my save"
    step = row(page, ident).locator('td[data-label="step"]').text_content()
    row(page, ident).locator('[data-action="resume"]').click()
    expect(phase(page)).to_have_text("training")
    expect(status_value(page, "run_id")).not_to_have_text(run_before)
    assert any(b and f'"resume_from":"{ident}"' in b for _, u, b in ui.posts if u.endswith("/start_training"))
    resumed = current_run(page)
    # The new run's group goes on top with its lineage; the run it came from keeps its rows below it.
    header = group(page, resumed).locator(".run-header")
    expect(header.locator(".run-lineage")).to_have_text(f"resumed from {ident} at step {step}")
    expect(header.locator(".run-current")).to_have_text("current")
    expect(group(page, run_before).locator(".run-header .run-current")).to_have_count(0)
    assert group_ids(page)[:2] == [resumed, run_before]
    assert group(page, run_before).locator(f'tr[data-id="{ident}"]').count() == 1
    expect(page.locator("#final-checkpoint")).to_be_hidden()  # a new run: the last one's note goes
    page.click("#stop")
    wait_until_stopped(page)


def test_reload_restores_the_samples_and_the_runs_settings(ui):
    page = ui.page
    status = fetch_json(page, "/status")
    assert status["phase"] == "finished" and status["config"]  # no more samples events will come
    final = page.locator("#final-checkpoint").get_attribute("data-id")
    page.reload()
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#samples .sample canvas.grid").first).to_be_visible()  # from GET /samples
    expect(page.locator("#config-source")).to_have_text(f"filled from run {status['run_id']}")
    form = form_values(page)
    wrong = {name: (form[name], value) for name, value in status["config"].items()
             if name in form and name != "checkpoint_dir" and not shows(form[name], value)}
    assert wrong == {}
    assert status["config"]["learning_rate"] == 0.002 != fetch_json(page, "/config")["defaults"]["learning_rate"]
    expect(page.locator("#final-checkpoint")).to_have_attribute("data-id", final)  # where it stopped, as before


def test_a_failed_run_shows_the_checkpoint_it_left(chromium, server_url):
    """The events of a run stopped without a final checkpoint (no such key), then of one that failed with a NaN
    loss, played to a page of its own: the error's final checkpoint (kind "error") is shown with its command."""
    import json
    final = {"id": "r2:error_step_7", "name": "error_step_7", "path": "/c/runs/r2/checkpoints/error_step_7.pth",
             "kind": "error", "resume_command": "python train.py --checkpoint-dir /c --resume r2:error_step_7"}
    events = [("training_stopped", {"run_id": "r1", "phase": "training", "global_step": 3}),
              ("training_error", {"run_id": "r2", "error": "loss is nan at step 7", "final_checkpoint": final})]
    stream = "retry: 3600000\n\n" + "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
    wrapped = Page(chromium.new_page(viewport={"width": 1280, "height": 800}))
    page = wrapped.page
    try:  # the stream ends after these; the page reconnects an hour later (retry)
        page.route("**/events*", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                               body=stream))
        page.goto(server_url)
        expect(page.locator(".toast", has_text="training stopped at step 3")).to_be_visible()
        shown = page.locator("#final-checkpoint")
        expect(shown).to_have_attribute("data-kind", "error")
        expect(shown).to_contain_text(f"Training failed; saved “error_step_7” (error) at {final['path']}")
        expect(shown.locator(".final-command")).to_have_text(final["resume_command"])
        expect(page.locator(".toast.toast-error", has_text="loss is nan")).to_contain_text(final["path"])
        assert wrapped.page_errors == []
    finally:
        page.close()


def test_no_script_or_policy_errors(ui):
    assert ui.page_errors == []
    # a 4xx answer logs "Failed to load resource" in Chromium; those are the tests' own bad requests
    unexpected = [e for e in ui.console_errors if "Failed to load resource" not in e]
    assert unexpected == []


def test_access_token_is_asked_once_and_kept_as_a_cookie(chromium, tmp_path, arc_data):
    """With a token every route but the page shell needs it: the page asks once, trades it for an HttpOnly
    cookie at POST /login, and its requests and its event stream carry that cookie."""
    with serve(tmp_path / "checkpoints", arc_data, TOKEN="s3cret") as url:
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(WAIT_MS)
        wrapped = Page(page)
        prompts = []
        page.on("dialog", lambda d: (prompts.append(d.message), d.accept("s3cret")))
        page.goto(url)
        expect(page.locator("#connection")).to_have_text("live")  # /events authenticated by the cookie
        assert len(prompts) == 1 and "access token" in prompts[0]
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["arc_lab_token"]["httpOnly"] is True and cookies["arc_lab_token"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # the page's scripts never read it back
        page.fill("#cfg-batch_size", "0")  # a refused config: the answer shows whether the token passed
        page.click("#start-training")
        expect(page.locator(".toast.toast-error", has_text="batch_size")).to_be_visible()
        assert len(prompts) == 1
        starts = [r for r in wrapped.requests if r.url.endswith("/start_training")]
        assert starts and all(r.headers.get("content-type") == "application/json" for r in starts)
        page.close()
        wrong = chromium.new_page()
        asked = []
        wrong.on("dialog", lambda d: (asked.append(d.message), d.accept("wrong")))
        wrong.goto(url)
        expect(wrong.locator(".toast.toast-error", has_text="wrong access token; reload")).to_be_visible()
        expect(wrong.locator(".toast.toast-error", has_text="/samples:")).to_be_visible()  # the page's last request
        assert len(asked) == 1  # refused once, not asked again for each request
        wrong.close()


def test_two_runs_with_the_same_name_are_grouped_and_deleted_apart(chromium, tmp_path, arc_data):
    """A run saved "same"; the page resumes from it into a second run that saves "same" too. The table shows two
    groups, the current run first, each header with its lineage; deleting the older run's row (which a bare name
    would not reach: it means the current run's) removes that run's file only."""
    from conftest import checkpoints_of, tiny_config
    from train import Trainer

    root = tmp_path / "checkpoints"
    first = Trainer(tiny_config(root, max_steps=3, checkpoint_every_epochs=0), arc_data, "cpu", str(root),
                    lambda event: None)

    def save_at_step_2(event):
        if event["type"] == "batch" and event["global_step"] == 2:
            first.commands.put({"type": "save", "name": "same", "request_id": "r"})

    first.publish = save_at_step_2
    first.train()
    older, older_folder = first.run_id, checkpoints_of(first)
    assert (older_folder / "same.pth").exists()
    # Two files the server refuses: a link, and a name outside the naming rules (it has no id).
    os.symlink(older_folder / "same.pth", older_folder / "linked.pth")
    (older_folder / "bad.name.pth").write_bytes((older_folder / "same.pth").read_bytes())

    with serve(root, arc_data) as url:
        ui = open_page(chromium, url)
        page = ui.page
        expect(row(page, f"{older}:same")).to_be_visible()
        assert group_ids(page) == [older]  # no run is current yet: the server has run nothing
        # So the form shows the newest run's settings (its epochs=1), not the server's defaults (50).
        expect(page.locator("#config-source")).to_have_text(f"filled from run {older}")
        expect(page.locator("#cfg-epochs")).to_have_value("1")
        # The overlay menu labels the run with its best score, read from its best_model row.
        best = row(page, f"{older}:best_model").locator('td[data-label="val_loss"]').text_content()
        expect(page.locator(f'#overlay-run option[value="{older}"]')).to_contain_text(f" · best val loss {best}")
        expect(group(page, older).locator(".run-lineage")).to_have_text("fresh run")
        # Refused files show why, and offer nothing to click: no radio, no action, no link.
        for refused, why in ((f'tr[data-id="{older}:linked"]', "symbolic link"),
                             ('tr[data-name="bad.name"]', "naming rules")):
            refused_row = page.locator(f"#checkpoints-table {refused}")
            expect(refused_row.locator(".row-error")).to_contain_text(why)
            expect(refused_row.locator("td.actions")).to_have_text(re.compile("^no actions"))
            assert refused_row.locator("[data-action], input, a").count() == 0
        assert page.locator('#checkpoints-table tr[data-name="bad.name"]').get_attribute("data-id") is None

        row(page, f"{older}:same").locator('[data-action="resume"]').click()
        expect(phase(page)).to_have_text("training")
        expect(page.locator("#save-checkpoint")).to_be_enabled()
        newer = current_run(page)
        assert newer != older
        save_via_prompt(ui, "same")  # the name is taken in the older run only: this run may use it
        expect(row(page, f"{newer}:same")).to_be_visible()
        page.click("#stop")
        wait_until_stopped(page)
        newer_folder = root / "runs" / newer / "checkpoints"
        assert (older_folder / "same.pth").exists() and (newer_folder / "same.pth").exists()

        # Two groups, the current run's on top, each with a header that says where the run came from.
        expect(page.locator("#checkpoints-table tbody.run-group")).to_have_count(2)
        assert group_ids(page) == [newer, older]
        headers = page.locator("#checkpoints-table tr.run-header")
        expect(headers.nth(0).locator(".run-id")).to_have_text(newer)
        expect(headers.nth(0).locator(".run-current")).to_have_text("current")
        expect(headers.nth(0).locator(".run-phase")).to_have_text("training")
        expect(headers.nth(0).locator(".run-lineage")).to_have_text(f"resumed from {older}:same at step 2")
        expect(headers.nth(1).locator(".run-id")).to_have_text(older)
        expect(headers.nth(1).locator(".run-current")).to_have_count(0)
        expect(headers.nth(1).locator(".run-what")).to_have_text("reconstruction/communication")
        expect(headers.nth(1).locator(".run-lineage")).to_have_text("fresh run")
        # Geometry: each "same" row sits under its own run's header, the newer run's group above the older's.
        # (one snapshot in the page: a refresh may redraw the table between two separate reads)
        boxes = page.evaluate("""ids => {
            const box = (e) => { const r = e.getBoundingClientRect(); return {y: r.y, height: r.height, width: r.width}; };
            const rows = ids.map((id) => document.querySelector(`#checkpoints-table tr[data-id="${id}"]`));
            return {headers: [...document.querySelectorAll('#checkpoints-table tr.run-header')].map(box),
                    rows: rows.map(box), table: box(document.getElementById('checkpoints-table'))};
        }""", [f"{newer}:same", f"{older}:same"])
        top, (newer_row, older_row) = boxes["headers"], boxes["rows"]
        assert top[0]["y"] + top[0]["height"] <= newer_row["y"] < top[1]["y"] <= older_row["y"] - top[1]["height"]
        for box in (*top, newer_row, older_row):
            assert box["width"] == pytest.approx(boxes["table"]["width"], abs=2)  # a header spans the table
        for r in (newer, older):
            expect(row(page, f"{r}:same").locator("td.name")).to_have_text("same")
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("() => document.querySelectorAll('.toast').forEach((toast) => toast.click())")
        page.locator(".checkpoints-panel").screenshot(path=str(ARTIFACTS / "checkpoint-groups.png"))
        page.set_viewport_size({"width": 420, "height": 900})  # narrow: rows become cards, headers stay whole
        # nothing sticks out sideways, once the charts have redrawn for the new width
        page.wait_for_function("() => document.documentElement.scrollWidth <= 420")
        narrow = page.evaluate("""() => [...document.querySelectorAll('#checkpoints-table tr.run-header')].map((h) => {
            const r = h.getBoundingClientRect(); return {x: r.x, width: r.width}; })""")
        assert all(0 <= h["x"] and h["x"] + h["width"] <= 420 for h in narrow), narrow
        ids = page.eval_on_selector_all("#checkpoints-table .run-id", """es => es.map((e) =>
            [getComputedStyle(e).whiteSpace, e.getBoundingClientRect().height])""")
        assert ids and all(space == "nowrap" and height < 24 for space, height in ids), ids  # one line each
        page.locator(".checkpoints-panel").screenshot(path=str(ARTIFACTS / "checkpoint-groups-narrow.png"))
        page.set_viewport_size({"width": 1280, "height": 800})

        # Delete the older run's "same": the confirmation names its run, the request its id.
        messages = []

        def accept(dialog):
            messages.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        row(page, f"{older}:same").locator('[data-action="delete"]').click()
        expect(row(page, f"{older}:same")).to_have_count(0)
        assert messages and older in messages[0]
        deletes = [u for m, u, _ in ui.posts if m == "DELETE"]
        assert deletes == [f"{url}/checkpoints/{encoded(older + ':same')}"]
        assert not (older_folder / "same.pth").exists() and not (older_folder / "same.json").exists()
        assert (newer_folder / "same.pth").exists() and (newer_folder / "same.json").exists()
        expect(row(page, f"{newer}:same")).to_be_visible()
        # The older run keeps its other files (best_model, the two refused ones), and its group shows them all.
        left = sorted(p.name[:-len(".pth")] for p in older_folder.glob("*.pth"))
        assert "linked" in left and "bad.name" in left
        shown = group(page, older).locator("tr[data-name]")
        expect(shown).to_have_count(len(left))
        assert sorted(shown.evaluate_all("rs => rs.map((r) => r.dataset.name)")) == left
        assert ui.page_errors == []
        page.close()


def test_a_run_on_two_processes_from_the_page(chromium, tmp_path):
    """app.py --nproc-per-node 2: the page's processes field shows it; Start launches a process group whose live
    figures and charts reach the page, and whose stop leaves its checkpoint, a DCP folder, in the table."""
    from conftest import write_task_folder
    from data import load_data

    tasks = write_task_folder(tmp_path / "tasks", n_training=6, n_evaluation=2)
    with serve(tmp_path / "checkpoints", load_data("arcagi", str(tasks)), DATA_DIR=str(tasks), PROCESSES=2,
               TRAIN_DEFAULTS={**TINY_TRAIN, "batch_size": 9, "epochs": 100000}) as url:
        ui = open_page(chromium, url)
        page = ui.page
        expect(page.locator("#processes")).to_have_value("2")
        page.click("#start-training")
        expect(status_value(page, "processes")).to_have_text("2", timeout=120_000)
        page.wait_for_function("() => { const d = document.getElementById('chart-loss').data;"
                               " return d && d[0].x.length >= 2; }", timeout=120_000)
        page.click("#stop")
        expect(phase(page)).to_have_text("finished", timeout=120_000)
        interrupted = page.locator('#checkpoints-table tr[data-name^="interrupted_step_"]')
        expect(interrupted).to_have_count(1)
        expect(interrupted.locator(".row-error")).to_have_count(0)
        assert not ui.page_errors and not ui.console_errors, (ui.page_errors, ui.console_errors)
        page.close()


@contextlib.contextmanager
def stoppable_store(monkeypatch):
    """A moto server in this process, which a test may stop and start again, its AWS_* variables set, and an
    ObjectRoot on a new bucket of it that gives up fast: with the store gone, an upload fails at once and one cut
    mid-request within seconds."""
    import remote
    from s3server import InProcessS3Server
    store = InProcessS3Server().start()
    try:
        for key, value in store.environment().items():
            monkeypatch.setenv(key, value)
        fail_fast = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
        target = remote.ObjectRoot(f"s3://{store.new_bucket()}/page", fail_fast)
        target.fs.retries = 1
        yield store, target
    finally:
        store.stop()


def test_the_table_shows_each_checkpoint_mirrored_only_there_or_its_failed_upload(chromium, tmp_path, arc_data,
                                                                                   monkeypatch):
    import requests

    import mirror
    with stoppable_store(monkeypatch) as (store, target):
        uploads = mirror.Mirror(str(tmp_path / "ck"), target, None, retention="local", attempts=2, first_backoff=0.05)
        with serve(tmp_path / "ck", arc_data, MIRROR=uploads) as url:
            ui = open_page(chromium, url)
            page = ui.page
            page.click("#start-training")
            expect(phase(page)).to_have_text("training")

            def save(name):
                answer = requests.post(url + "/save_checkpoint", json={"name": name, "wait": True}, timeout=60)
                assert answer.status_code == 200, answer.text
                return answer.json()["id"]
            online = save("online")
            expect(page.locator(f'tr[data-id="{online}"] .mirror')).to_have_text("mirrored")
            # Deleted here, kept there: listed as the mirror's, with Restore as its one action.
            assert requests.delete(f"{url}/checkpoints/{online}", json={}, timeout=10).status_code == 200
            page.click("#refresh-checkpoints")
            expect(page.locator(f'tr[data-id="{online}"] .mirror')).to_have_text("on the mirror only")
            expect(page.locator(f'tr[data-id="{online}"] [data-action]')).to_have_count(1)
            page.click(f'tr[data-id="{online}"] [data-action=restore]')
            expect(page.locator(".toast.toast-success", has_text="restored from the mirror")).to_be_visible()
            expect(page.locator(f'tr[data-id="{online}"] .mirror')).to_have_text("mirrored")
            expect(page.locator(f'tr[data-id="{online}"] [data-action=verify]')).to_be_visible()
            assert uploads.wait(30)  # no upload (a best_model's) in flight when the store goes
            store.stop()
            offline = save("offline")
            last_try = "Mirror: upload of “offline” failed (attempt 2/2)"  # the first one's toast may show beside it
            failure = page.locator(".toast.toast-error", has_text=last_try)
            expect(failure).to_be_visible()
            expect(page.locator(f'tr[data-id="{offline}"] .mirror')).to_have_text("upload failed")
            expect(page.locator(f'tr[data-id="{offline}"] .row-error')).to_contain_text("cannot reach the endpoint")
            page.click("#stop")
            expect(phase(page)).not_to_have_text("training")
            assert ui.page_errors == [] and store.secret not in page.content()
            page.close()


def test_the_status_shows_the_mirror_and_its_last_error_and_a_listing_that_fails_says_so(chromium, tmp_path,
                                                                                       arc_data, monkeypatch):
    import requests

    import catalogue
    import checkpoint as ckpt
    import mirror
    from test_checkpoint import record_fields
    with stoppable_store(monkeypatch) as (store, target):
        root = tmp_path / "ck"
        run_id = catalogue.new_run_id()
        catalogue.create_run(str(root), run_id, {"phase": "training"})
        folder = catalogue.checkpoint_folder(str(root), run_id)
        ckpt.save_full_checkpoint(folder, **record_fields("kept", folder=folder))  # uploaded by the start's catch-up
        ident = catalogue.checkpoint_id(run_id, "kept")
        uploads = mirror.Mirror(str(root), target, None, attempts=2, first_backoff=0.05)
        with serve(root, arc_data, MIRROR=uploads) as url:
            ui = open_page(chromium, url)
            page = ui.page
            expect(row(page, ident).locator(".mirror")).to_have_text("mirrored")
            mirror_row = status_value(page, "mirror")
            expect(mirror_row).to_have_text(f"{target.url} · idle")
            expect(status_value(page, "mirror_error")).to_have_count(0)
            listing_error = page.locator("#mirror-listing-error")
            expect(listing_error).to_be_hidden()
            store.stop()
            # No run trains: only the mirror's own events bring the status that shows its failure.
            assert requests.delete(f"{url}/checkpoints/{ident}", json={}, timeout=10).status_code == 200
            expect(mirror_row).to_have_text(f"{target.url} · failed")
            error_row = status_value(page, "mirror_error")
            expect(error_row).to_contain_text(f"delete of {ident} (attempt 2/2")
            expect(error_row).to_contain_text("cannot reach the endpoint")
            page.click("#refresh-checkpoints")  # the store is gone: the listing carries mirror_error
            expect(listing_error).to_be_visible()
            expect(listing_error).to_contain_text(f"could not list {target.url}: cannot reach the endpoint")
            store.start()  # back: the next listing has no error
            page.click("#refresh-checkpoints")
            expect(listing_error).to_be_hidden()
            assert ui.page_errors == [] and store.secret not in page.content()
            page.close()


def test_the_language_panel_draws_the_heatmap_and_the_most_frequent_messages(chromium, tmp_path, arc_data):
    """A selection run's first validation: the panel appears live, one heatmap cell per position and symbol (each
    position's shares adding up to all messages), the top messages most frequent first with their grids; a
    reload draws it again from GET /samples."""
    with serve(tmp_path / "checkpoints", arc_data) as url:
        ui = open_page(chromium, url)
        page = ui.page
        try:
            expect(page.locator("#language-panel")).to_be_hidden()  # no run, no message yet
            started = page.evaluate("""() => fetch('/start_training', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({task_type: 'selection', max_steps: 2, epochs: 1})}).then((r) => r.status)""")
            assert started == 202
            for visit in ("live", "after a reload"):
                expect(page.locator("#language-panel")).to_be_visible()
                expect(page.locator("#language .heatmap td.usage")).to_have_count(5 * 10)
                shares = page.eval_on_selector_all("#language .heatmap tbody tr", """rows => rows.map((r) =>
                    [...r.querySelectorAll('td.usage')].reduce((sum, td) => sum + Number(td.dataset.share), 0))""")
                assert len(shares) == 5 and all(abs(s - 1) < 0.01 for s in shares), (visit, shares)
                counts = [int(c) for c in page.eval_on_selector_all("#language .top-message",
                                                                    "items => items.map((i) => i.dataset.count)")]
                assert 1 <= len(counts) <= 10 and counts == sorted(counts, reverse=True), (visit, counts)
                first = page.locator("#language .top-message").first
                expect(first.locator(".message .token")).to_have_count(5)
                assert 1 <= first.locator(".top-message-example canvas.grid").count() <= 3
                help_text = page.locator('#language dd[data-key="topsim"]').get_attribute("title")
                sampled = fetch_json(page, "/samples")["language"]["topsim_examples"]
                assert "Messages: Hamming" in help_text and f" {sampled} validation examples" in help_text, help_text
                assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280  # nothing sticks out
                if visit == "live":
                    expect(phase(page)).to_have_text("finished")
                    expect(status_value(page, "topsim")).to_have_text(re.compile(r"^-?[0-9]"))
                    page.reload()
                    expect(page.locator("#connection")).to_have_text("live")
            unexpected = [e for e in ui.console_errors if "Failed to load resource" not in e]
            assert ui.page_errors == [] and unexpected == [], (ui.page_errors, unexpected)
        finally:
            page.close()

