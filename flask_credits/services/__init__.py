"""Services: purchases and their settlement, Stripe webhooks, request Idempotency-Keys, and the Stripe
gateway (the only module that imports ``stripe``). They use the ledger core and storage, never HTTP."""
