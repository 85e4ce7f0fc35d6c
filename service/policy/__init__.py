"""The worker's one load policy: who a request's client is, what each client holds of the
worker, one way to take any of it, and the rule that makes a refusal a 429 or a 503.

Every limit a classify request meets in a worker is a resource taken with
:meth:`Policy.reserve` into the request's one :class:`Lease`, and given back when the lease
ends, however the request ends:

- ``requests``: a classify slot (``GATEWAY_MAX_CONCURRENCY``, waited for at most
  ``GATEWAY_QUEUE_TIMEOUT_S``), at most ``GATEWAY_MAX_CONCURRENCY_PER_CLIENT`` a client;
- ``body_bytes``: memory for what the request holds (its body as it will cost once read,
  then its crops), from the worker's one memory account (service/memory.py), within the
  part of it bodies may take (``GATEWAY_BUFFER_BUDGET_BYTES``) so that decodes always find
  room; the decode threads take the decoded pixels from the same account;
- ``images`` at ``models``: places in each model's admission limit (service/admission.py),
  within the client's fair share;
- ``decodes``: places in the decode queue (``GATEWAY_DECODE_QUEUE``).

The parts, one module each:

- **who the client is** (clients.py): resolved once per request;
- **what each client holds** (ledger.py): one table, per client what it holds of each
  resource and its budget of error answers, one pruning rule (a client that holds nothing
  and has earned its whole error budget back is forgotten);
- **429 or 503** (refusals.py): one rule, by whose limit is reached (the client's, the
  worker's, a model's), and which error answers are paced (only the client's own);
- **the resources** (worker.py): :class:`Policy` and its :class:`Lease`.
"""

from .clients import client_of, given_key
from .ledger import PRUNE_AT, Ledger
from .refusals import Refusal, hold_error, paced, refuse
from .worker import Lease, Policy

__all__ = [
    "PRUNE_AT",
    "Lease",
    "Ledger",
    "Policy",
    "Refusal",
    "client_of",
    "given_key",
    "hold_error",
    "paced",
    "refuse",
]
