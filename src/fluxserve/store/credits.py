"""The credit ledger: a metered key's balance (``api_keys.credits``; NULL: not metered), held when a priced job
is created and given back when it does not succeed. Every change is one statement inside the caller's
transaction, the one that creates or ends the job, so a job is charged once and refunded at most once."""

from __future__ import annotations

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection

from ..errors import PaymentRequired
from ..job import Job
from .db import Database
from .schema import api_keys

EPSILON = 1e-9  # float balances: a price equal to the balance is affordable


def hold(conn: Connection, job: Job) -> float | None:
    """Hold the job's price from its key's balance; what is held (None: the key is not metered, so nothing
    is, and nothing will be given back should it be metered later). PaymentRequired when it has too little.

    One conditional UPDATE: concurrent creates of one key can never spend more than it has."""
    if not job.cost:
        return None
    if _debit(conn, job.owner, job.cost):
        return job.cost
    if conn.execute(select(api_keys.c.credits).where(api_keys.c.id == job.owner)).scalar() is None:
        return None
    raise PaymentRequired(
        f"This request costs {job.cost:g} credits ({job.spec.model}, {job.spec.num_images} image(s)); "
        "the API key's balance is lower. Top it up with `fluxserve keys update --credits`.",
        param="credits",
    )


def reprice(conn: Connection, owner: str, held: float | None, price: float | None, what: str) -> float | None:
    """A job that moves to another route (spill-over, failover, back from a spill) costs that route's price:
    the difference is held now, or given back. Returns what the job holds afterwards; PaymentRequired when
    the key cannot pay the difference (the move does not happen)."""
    if held is None and conn.execute(select(api_keys.c.credits).where(api_keys.c.id == owner)).scalar() is None:
        return None  # not metered when it was created: it stays free wherever it runs
    difference = (price or 0.0) - (held or 0.0)
    if difference > EPSILON and not _debit(conn, owner, difference):
        raise PaymentRequired(
            f"Running it on {what} costs {difference:g} more credits than were held; the key's balance is lower.",
            param="credits",
        )
    if difference < -EPSILON:
        _credit(conn, owner, -difference)
    return price or None


def _debit(conn: Connection, owner: str, amount: float) -> bool:
    paid = conn.execute(
        update(api_keys)
        .where(and_(api_keys.c.id == owner, api_keys.c.credits.is_not(None), api_keys.c.credits >= amount - EPSILON))
        .values(credits=api_keys.c.credits - amount)
    ).rowcount
    return bool(paid)


def _credit(conn: Connection, owner: str, amount: float) -> None:
    conn.execute(
        update(api_keys)
        .where(and_(api_keys.c.id == owner, api_keys.c.credits.is_not(None)))
        .values(credits=api_keys.c.credits + amount)
    )


def give_back(conn: Connection, job: Job) -> None:
    """Return what the job held, when it ends without succeeding (only metered keys hold anything)."""
    if job.cost:
        _credit(conn, job.owner, job.cost)


class CreditQueries(Database):
    def set_key_credits(self, id_or_name: str, credits: float | None) -> int:
        """A key's balance (None: not metered), on the active key(s) with this id or name."""
        active = and_((api_keys.c.id == id_or_name) | (api_keys.c.name == id_or_name), api_keys.c.revoked_at.is_(None))
        with self._write() as conn:
            return conn.execute(update(api_keys).where(active).values(credits=credits)).rowcount

    def key_credits(self, owner: str) -> float | None:
        with self._read() as conn:
            value = conn.execute(select(api_keys.c.credits).where(api_keys.c.id == owner)).scalar()
        return None if value is None else float(value)
