"""The API and the console on running nodes, with messages travelling over a real broker.

The browser test drives Debian's chromium headless with Playwright (no browser download):
an officer issues a certificate on one node's console, another officer confirms it on the
importer's console, and both consoles then show the loop closed. It takes a screenshot of
the closed loop; with ``KPX_UPDATE_SCREENSHOT=1`` it replaces the one the README shows
(docs/console.png), otherwise it leaves the working tree alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.machine import Side, State
from node.network import create_network
from node.runner import RunningNode
from node.service import Node, now_ms
from node.tokens import Role, Tokens
from tests.netutil import certificate_json, fresh_codes
from tests.test_network import state, until

pytestmark = pytest.mark.broker

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"


@dataclass
class Site:
    code: str
    node: Node
    base: str
    officer: str

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
async def sites(amqp_url: str, tmp_path: Path) -> AsyncIterator[tuple[Site, Site]]:
    codes = fresh_codes(2)
    network = create_network(tmp_path, codes, [amqp_url])
    async with AsyncExitStack() as stack:
        found = []
        for code in codes:
            # the node's own HTTP server (kpnode run with http_port) on a free port
            running = RunningNode(dataclasses.replace(network.configs[code], http_port=0))
            await running.start()
            stack.push_async_callback(running.stop)
            assert running.node is not None and running.http is not None
            token = Tokens(network.configs[code].directory).add(
                f"{code.lower()}-officer", Role.OFFICER, now_ms())
            found.append(Site(code, running.node, running.http.url, token))
        yield found[0], found[1]


async def test_api_calls_close_a_loop_across_the_broker(sites: tuple[Site, Site]) -> None:
    from aiohttp import ClientSession

    exporter, importer = sites
    number = f"{exporter.code}-2026-0001"
    async with ClientSession() as http:
        response = await http.post(
            exporter.url("/api/v1/certificates"),
            headers={"Authorization": f"Bearer {exporter.officer}", "Idempotency-Key": "k1"},
            json=certificate_json(number, exporter.code, importer.code))
        assert response.status == 201, await response.text()
        await until(lambda: state(importer.node, Side.IMPORT, number) is State.RECEIVED)
        response = await http.post(importer.url(f"/api/v1/certificates/{number}/confirm"),
                                   headers={"Authorization": f"Bearer {importer.officer}"})
        assert response.status == 200, await response.text()
        await until(lambda: state(exporter.node, Side.EXPORT, number) is State.CONFIRMED)
        response = await http.get(exporter.url(f"/api/v1/certificates/{number}"),
                                  headers={"Authorization": f"Bearer {exporter.officer}"})
        shown = await response.json()
    assert [h["kind"] for h in shown["history"]] == ["certificate", "receipt",
                                                     "import_confirmation"]


async def test_officers_close_a_loop_in_two_browsers(sites: tuple[Site, Site],
                                                     tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap.sh " \
                  "does it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import Page, async_playwright, expect

    exporter, importer = sites
    number = f"{exporter.code}-2026-0042"

    async def log_in(page: Page, site: Site) -> None:
        await page.goto(site.url("/console"))
        await page.get_by_label("Token").fill(site.officer)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.locator("h1")).to_contain_text(site.code)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   args=CHROMIUM_ARGS)
        try:
            viewport = {"width": 1200, "height": 760}
            exporting = await (await browser.new_context(viewport=viewport)).new_page()
            importing = await (await browser.new_context(viewport=viewport)).new_page()

            await log_in(exporting, exporter)
            await exporting.get_by_role("link", name="Issue").click()
            form = exporting.locator("form#issue")
            await form.locator("[name=number]").fill(number)
            await form.locator("[name=destination]").select_option(importer.code)
            await form.locator("[name=exporter_name]").fill(f"{exporter.code} Mining Ltd")
            await form.locator("[name=exporter_address]").fill("1 Main Road, Kimberley")
            await form.locator("[name=importer_name]").fill(f"{importer.code} Traders")
            await form.locator("[name=importer_address]").fill("2 Bourse Road")
            await form.locator("[name=parcels]").fill("3")
            await form.locator("[name=hs0]").select_option("7102.31")
            await form.locator("[name=carats0]").fill("2500.00")
            await form.locator("[name=usd0]").fill("400000.00")
            await form.get_by_role("button", name="Sign and send").click()
            await expect(exporting.locator(".flash")).to_contain_text(f"{number} issued")
            row = exporting.locator(f"tr[data-number='{number}']")
            await expect(row).to_be_visible()

            await log_in(importing, importer)
            await importing.get_by_role("link", name="Incoming").click()
            waiting = importing.locator(f"#waiting tr[data-number='{number}']")
            for _ in range(60):  # the certificate travels through the broker
                if await waiting.count():
                    break
                await importing.wait_for_timeout(500)
                await importing.reload()
            await waiting.get_by_role("button", name="Confirm arrival").click()
            await expect(importing.locator(".flash")).to_contain_text(f"{number} confirmed")
            await expect(importing.locator(f"#imports tr[data-number='{number}'] .badge")
                         ).to_have_text("confirmed")

            closed = exporting.locator(f"tr[data-number='{number}'] .badge")
            for _ in range(60):  # the confirmation travels back
                await exporting.reload()
                if (await closed.inner_text()) == "confirmed":
                    break
                await exporting.wait_for_timeout(500)
            await expect(closed).to_have_text("confirmed")

            await exporting.goto(exporter.url(f"/console/certificate/{number}"))
            kinds = await exporting.locator("#history tbody td:nth-child(3)").all_inner_texts()
            assert kinds == ["certificate", "receipt", "import_confirmation"]
            await importing.goto(importer.url(f"/console/certificate/{number}"))
            kinds = await importing.locator("#history tbody td:nth-child(3)").all_inner_texts()
            assert kinds == ["certificate", "receipt", "import_confirmation"]

            await exporting.goto(exporter.url(f"/console/certificate/{number}"))
            screenshot = (README_SCREENSHOT if os.environ.get("KPX_UPDATE_SCREENSHOT") == "1"
                          else tmp_path / "console.png")
            await exporting.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000  # a rendered page, not an empty one
        finally:
            await browser.close()
    assert state(exporter.node, Side.EXPORT, number) is State.CONFIRMED
    assert state(importer.node, Side.IMPORT, number) is State.CONFIRMED
