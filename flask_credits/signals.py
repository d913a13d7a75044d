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

#: A delayed payment for a Checkout Session failed, or an invoice of a plan could not be charged
#: (the subscription is then ``past_due``); nothing was credited.
#: Arguments: ``wallet``, ``purchase`` (``None`` for a plan); for a plan also ``subscription``.
credits_payment_failed = _signals.signal("credits-payment-failed")

#: Credits were reserved by :meth:`FlaskCredits.hold` (or ``@requires_credits(hold=...)``); they stay
#: in the wallet but cannot be spent until the hold is settled, released or expires.
#: Arguments: ``wallet``, ``hold`` (a :class:`flask_credits.Hold`), ``amount`` (int, credits reserved
#: by this call: the whole hold, or what an extension added).
credits_held = _signals.signal("credits-held")

#: A hold was settled: ``amount`` credits were charged (one spend entry) and the rest given back.
#: Arguments: ``wallet``, ``hold``, ``held`` (int, credits the hold reserved), ``amount`` (int, the
#: charge), ``entry`` (the spend, or ``None`` when nothing left the wallet: all of it became debt).
credits_settled = _signals.signal("credits-settled")

#: A hold ended without a charge: released, settled at 0, or past its expiry.
#: Arguments: ``wallet``, ``hold``, ``amount`` (int, credits given back), ``expired`` (bool).
credits_released = _signals.signal("credits-released")

#: A settle charged more than the wallet could pay (the work was done): the rest became debt, which
#: the next purchase pays first.
#: Arguments: ``wallet``, ``hold``, ``amount`` (int, credits added to the debt), ``entry`` (or None).
credits_overdrawn = _signals.signal("credits-overdrawn")

#: A plan's first invoice was paid: its allowance was granted (``credits_granted`` is sent too).
#: Arguments: ``wallet``, ``subscription`` (a :class:`flask_credits.Subscription`), ``amount`` (int,
#: credits granted), ``entry``.
plan_started = _signals.signal("plan-started")

#: A renewal invoice of a plan was paid: a new allowance was granted (``credits_granted`` too).
#: Arguments: ``wallet``, ``subscription``, ``amount`` (int), ``entry``.
plan_renewed = _signals.signal("plan-renewed")

#: The subscription moved to another plan (through the billing portal). An upgrade grants the
#: difference in allowance at once, for the rest of the period; a downgrade grants nothing now (the
#: next renewal grants the new plan's allowance).
#: Arguments: ``wallet``, ``subscription``, ``previous`` (str, the plan it left), ``amount`` (int,
#: credits granted now, 0 for a downgrade), ``entry`` (or ``None``).
plan_changed = _signals.signal("plan-changed")

#: The subscription ended (Stripe deleted it): nothing more is granted; what was granted stays until
#: it expires. Arguments: ``wallet``, ``subscription``.
plan_cancelled = _signals.signal("plan-cancelled")

#: A debit (a spend, or a settle) took the wallet from at or above its low-balance threshold to below
#: it (``CREDITS_LOW_BALANCE``, or the wallet's own: ``FlaskCredits.set_low_balance``); once per
#: crossing. Arguments: ``wallet``, ``balance`` (int, credits in the wallet after it, held ones
#: included), ``threshold`` (int), ``entry`` (the debit).
credits_low = _signals.signal("credits-low")

#: A debit took the wallet below its auto top-up threshold and an automatic purchase started (its
#: Stripe call follows on a worker thread). Arguments: ``wallet``, ``purchase``, ``entry`` (the debit
#: that crossed). ``credits_purchased`` follows once it is paid.
auto_top_up_started = _signals.signal("auto-top-up-started")

#: An automatic purchase failed (declined, the bank asked for 3-D Secure, no card, or never confirmed):
#: auto top-up is now off for the wallet. Arguments: ``wallet``, ``purchase``, ``reason`` (str, for
#: the user).
auto_top_up_failed = _signals.signal("auto-top-up-failed")

#: A credit code was redeemed (:meth:`FlaskCredits.redeem_code`, ``POST /credits/redeem``); its grant
#: and the redemption committed together (``credits_granted`` is sent too).
#: Arguments: ``wallet``, ``amount`` (int, credits granted), ``entry``, ``code`` (a
#: :class:`flask_credits.CreditCode`, read just before this redemption: its ``redeemed`` does
#: not count it).
credits_redeemed = _signals.signal("credits-redeemed")

#: Credits moved from one wallet to another (:meth:`FlaskCredits.transfer`, ``flask credits
#: transfer``, the credits page's "Move credits"); committed as one transaction.
#: Arguments: ``from_wallet``, ``to_wallet`` (:class:`flask_credits.Wallet`), ``amount`` (int),
#: ``entry`` (the source's transfer entry), ``to_entry`` (the target's).
credits_transferred = _signals.signal("credits-transferred")

#: ``flask credits reconcile`` (:meth:`FlaskCredits.reconcile`) found a purchase out of step with
#: Stripe, a webhook lost for good, and fixed it (the usual signals, ``credits_purchased`` or
#: ``credits_revoked``, are sent too): alert on it. Arguments: ``wallet``, ``purchase`` (as it is
#: now), ``action`` (str: ``fulfilled``, ``expired``, ``failed``, ``mismatch``, ``refund``,
#: ``dispute`` or ``dispute_won``).
purchase_reconciled = _signals.signal("purchase-reconciled")

__all__ = [
    "auto_top_up_failed",
    "auto_top_up_started",
    "credits_expired",
    "credits_granted",
    "credits_held",
    "credits_insufficient",
    "credits_low",
    "credits_overdrawn",
    "credits_payment_failed",
    "credits_purchased",
    "credits_redeemed",
    "credits_refunded",
    "credits_released",
    "credits_revoked",
    "credits_settled",
    "credits_spent",
    "credits_transferred",
    "plan_cancelled",
    "plan_changed",
    "plan_renewed",
    "plan_started",
    "purchase_reconciled",
]
