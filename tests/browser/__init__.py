"""The page at `/` and the API as web apps use it, in a real browser (Debian's chromium,
driven by Playwright)."""
