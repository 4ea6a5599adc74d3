"""`syncd sandbox`: a strict local emulator of the Amazon Ads Advertiser audiences API.

`validation.py` checks requests (pure functions); `state.py` holds what the sandbox knows and
decides (settings, jobs, ledger, members, counters, faults); `app.py` is the aiohttp application
over both; `server.py` runs it (`running_sandbox`) and registers the `syncd sandbox` subcommand.
"""
