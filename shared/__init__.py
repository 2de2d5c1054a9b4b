"""GBX Entitlements: the library every Cloud Function of the service shares."""
