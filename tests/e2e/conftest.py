"""End-to-end fixtures: one real ComfyUI server per test session (temporary base directory, free port, SIGTERM
at the end) and one headless-Chromium page on the real frontend per test module. See e2e_support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import ARTIFACTS, AppPage, ComfyServer, launch_chromium, open_app, start_server, stop_server


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
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
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
