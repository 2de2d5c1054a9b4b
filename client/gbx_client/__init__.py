"""GBX Entitlements runner client: `gbx run`, `gbx complete`, `gbx verify`, `gbx hash`; and the seal format the service shares."""
