"""Every signal flask_credits sends. The sender is always the app.

Signals are sent only after the ledger transaction has committed. A receiver that raises is logged and
never undoes the change, nor stops the other receivers. Connect with ``signal.connect_via(app)`` or
``signal.connect``. Each receiver gets the keyword arguments listed in the comment above the signal;
``wallet`` is a :class:`flask_credits.Wallet` and ``entry`` a :class:`flask_credits.Entry`.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Credits were added by :meth:`FlaskCredits.grant` (also from ``flask credits grant``).
#: Arguments: ``wallet``, ``amount`` (int), ``entry``.
credits_granted = _signals.signal("credits-granted")

#: Credits were debited by :meth:`FlaskCredits.spend` or ``@requires_credits``.
#: Arguments: ``wallet``, ``amount`` (int), ``entry``.
credits_spent = _signals.signal("credits-spent")

#: A debit was returned to the wallet, usually because the decorated view failed.
#: Arguments: ``wallet``, ``amount`` (int), ``entry`` (the refund), ``spend`` (the entry it reverses).
credits_refunded = _signals.signal("credits-refunded")

#: A spend was refused because the wallet could not pay; nothing was written.
#: Arguments: ``wallet``, ``required`` (int), ``balance`` (int).
credits_insufficient = _signals.signal("credits-insufficient")

#: Credits of one or more lots passed their expiry and stopped counting.
#: Arguments: ``wallet``, ``amount`` (int, credits removed), ``entry``.
credits_expired = _signals.signal("credits-expired")

#: A Stripe Checkout purchase was credited (exactly once per Checkout Session).
#: Arguments: ``wallet``, ``amount`` (int, credits granted), ``entry``, ``purchase``.
credits_purchased = _signals.signal("credits-purchased")

#: Credits were clawed back (refund or dispute) or given back (dispute won).
#: Arguments: ``wallet``, ``amount`` (int, credits removed; negative when given back),
#: ``entry`` (or ``None`` when everything went to debt), ``purchase``, ``cause`` (str).
credits_revoked = _signals.signal("credits-revoked")

#: A delayed payment for a Checkout Session failed; nothing was credited.
#: Arguments: ``wallet``, ``purchase``.
credits_payment_failed = _signals.signal("credits-payment-failed")

__all__ = [
    "credits_expired",
    "credits_granted",
    "credits_insufficient",
    "credits_payment_failed",
    "credits_purchased",
    "credits_refunded",
    "credits_revoked",
    "credits_spent",
]
