"""Headless Chromium for the monitor's browser tests: Debian's `chromium` package driven by Playwright
for Python. Nothing here downloads a browser (never `playwright install`): scripts/services --browser
installs chromium with apt-get. Without it these tests fail, loudly; CARROT_SKIP_BROWSER=1 skips them
on purpose."""
import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get('CARROT_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--no-first-run', '--disable-sync']
ARTIFACTS = Path(__file__).resolve().parents[1] / 'artifacts'

# Playwright's sync API runs an asyncio loop in this thread; the test's own ORM calls are synchronous
# code all the same (the live server answers the browser from its own thread).
os.environ.setdefault('DJANGO_ALLOW_ASYNC_UNSAFE', 'true')


@pytest.fixture(scope='session')
def chromium():
    if os.environ.get('CARROT_SKIP_BROWSER') == '1':
        pytest.skip('CARROT_SKIP_BROWSER=1: browser tests skipped on request')
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('Playwright for Python is missing: scripts/bootstrap installs the test extras '
                    '(or set CARROT_SKIP_BROWSER=1 to skip the browser tests)', pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f'{CHROMIUM} is missing: run scripts/services --browser (apt-get install chromium), '
                    f'point CARROT_CHROMIUM at a Chromium, or set CARROT_SKIP_BROWSER=1 to skip the browser '
                    f'tests', pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={'width': 1280, 'height': 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.dialogs = []
    page.on('dialog', lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.script_errors = []  # uncaught JavaScript exceptions
    page.on('pageerror', lambda error: page.script_errors.append(str(error)))
    page.bad_responses = []  # the monitor's own pages, API calls and static files that failed
    page.on('response', lambda response: page.bad_responses.append(f'{response.status} {response.url}')
            if response.status >= 400 and ('/carrot/' in response.url or '/static/' in response.url) else None)
    yield page
    context.close()


@pytest.fixture(scope='session')
def artifacts():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
