"""`syncd sandbox`: a strict local emulator of the Amazon Ads Advertiser audiences API.

`app.py` holds the aiohttp application and its state (jobs, ledger, members, counters, faults);
`server.py` runs it (`running_sandbox`) and registers the `syncd sandbox` subcommand.
"""
