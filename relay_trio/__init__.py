"""relay-trio: a reliable, rate-limited report relay built on Trio structured concurrency.

The implementation lives in private modules; this file is the whole public surface.
"""

__version__ = "0.1.0"

from ._config import ConfigError as ConfigError
from ._config import RelayConfig as RelayConfig
from ._config import load_config as load_config
from ._events import TOPICS as TOPICS
from ._events import Event as Event
from ._events import EventRing as EventRing
from ._events import Page as Page
from ._hub import EventHub as EventHub
from ._hub import SubscriberLimit as SubscriberLimit
from ._hub import Subscription as Subscription
from ._identity import check_identity as check_identity
from ._listen import ListenAddress as ListenAddress
from ._listen import parse_listen as parse_listen
from ._model import Accepted as Accepted
from ._model import Admitter as Admitter
from ._model import Problem as Problem
from ._model import Report as Report
from ._ratelimit import LeakyBucket as LeakyBucket
from ._receiver import ReceiverLimits as ReceiverLimits
from ._receiver import StreamReceiver as StreamReceiver
from ._relay import Relay as Relay
from ._resources import ResourceState as ResourceState
from ._resources import ResourceTable as ResourceTable
from ._scheduler import DeadlineScheduler as DeadlineScheduler
from ._sender import FileUpstream as FileUpstream
from ._sender import HttpUpstream as HttpUpstream
from ._sender import Outbound as Outbound
from ._sender import SenderPool as SenderPool
from ._sender import Upstream as Upstream
from ._server import RelayServer as RelayServer
from ._sidequeue import SideQueue as SideQueue
from ._umh import AckOutcome as AckOutcome
from ._umh import DeadLetter as DeadLetter
from ._umh import RetryPolicy as RetryPolicy
from ._umh import UnconfirmedMessages as UnconfirmedMessages
from ._upstreams import HealthPolicy as HealthPolicy
from ._upstreams import UpstreamRouter as UpstreamRouter
from ._upstreams import rendezvous_score as rendezvous_score
