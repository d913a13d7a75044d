"""The ledger core: wallet operations (grant, spend, refund, expire, settle a purchase's credits), the
checks on their inputs, and the audit. Below the services; uses only storage."""
