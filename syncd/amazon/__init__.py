"""The Amazon Ads "Advertiser audiences" API: constants/types (api), LwA auth, retry, client."""
