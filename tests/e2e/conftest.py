"""End-to-end fixtures: one real ComfyUI server per test session (temporary base directory, free port, SIGTERM
at the end) and one headless Chromium with one page on the real frontend per test module. See e2e_support.py.

rendered_page runs a test in each of the frontend's two renderers (classic canvas, Vue "Nodes 2.0") with the
pinned frontend and with the newest comfyui-frontend-package from PyPI (a second server, started only when such a
test runs; the package is installed once under .comfy-state/frontend-latest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import (
    ARTIFACTS,
    AppPage,
    ComfyServer,
    RenderedPage,
    latest_frontend_root,
    launch_chromium,
    open_app,
    start_server,
    stop_server,
)

VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
RENDER_COMBINATIONS = [("pinned", False), ("pinned", True), ("latest", False), ("latest", True)]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    try:
        server = start_server(tmp_path_factory.mktemp("comfy-base"))
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield server
    finally:
        stop_server(server)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "e2e-server.log").write_bytes(server.log_path.read_bytes())


@pytest.fixture(scope="session")
def latest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """The same server with the newest comfyui-frontend-package from PyPI as its frontend."""
    try:
        version, static = latest_frontend_root()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"the newest comfyui-frontend-package could not be installed, so it is not tested: {error}")
    try:
        server = start_server(tmp_path_factory.mktemp(f"comfy-base-frontend-{version}"), front_end_root=static)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield server
    finally:
        stop_server(server)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "e2e-server-latest-frontend.log").write_bytes(server.log_path.read_bytes())


@pytest.fixture(scope="module", params=RENDER_COMBINATIONS,
                ids=[f"{frontend}-{'vue' if vue else 'classic'}" for frontend, vue in RENDER_COMBINATIONS])
def rendered_page(request: pytest.FixtureRequest, browser_context: object,
                  comfy_server: ComfyServer) -> Iterator[RenderedPage]:
    """A fresh page in one renderer of one frontend; the user setting is stored on the server, as the settings
    dialog stores it, before the page loads."""
    frontend, vue = request.param
    server = comfy_server if frontend == "pinned" else request.getfixturevalue("latest_server")
    status, answer = server.request(f"/settings/{VUE_NODES_SETTING}", vue)
    assert status == 200, f"could not store {VUE_NODES_SETTING}: {status} {answer}"
    page = open_app(browser_context, server)
    try:
        mode = page.evaluate("() => Boolean(LiteGraph.vueNodesMode)")
        assert mode is vue, f"{VUE_NODES_SETTING}={vue} did not select that renderer (vueNodesMode {mode})"
        version = page.evaluate("() => String(window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown')")
        # A fresh user's start-up noise is the app's own; anything from the pack's extension is not.
        from_pack = [error for error in page.take_unknown_errors() if "spectral" in error.lower()]
        assert not from_pack, f"the pack's extension logged errors at start-up: {from_pack}"
        yield RenderedPage(page, frontend, version, vue)
    finally:
        page.page.close()
        server.request(f"/settings/{VUE_NODES_SETTING}", False)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One Chromium per test module. Playwright's sync API keeps an asyncio loop running in this thread while it
    is open, so a longer-lived browser would break every later test that runs ComfyUI's executor (asyncio.run)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            context = launch_chromium(playwright, tmp_path_factory.mktemp("chromium-profile"))
        except RuntimeError as error:
            pytest.fail(str(error))
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def app_page(browser_context: object, comfy_server: ComfyServer) -> Iterator[AppPage]:
    """One page per test module (the app takes seconds to start); each test loads its own graph into it."""
    page = open_app(browser_context, comfy_server)
    try:
        yield page
    finally:
        page.page.close()
