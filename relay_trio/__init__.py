"""relay-trio: a reliable, rate-limited report relay built on Trio structured concurrency.

The implementation lives in private modules; this file is the whole public surface.
"""

__version__ = "0.1.0"

from .core.config import ConfigError as ConfigError
from .core.config import RelayConfig as RelayConfig
from .core.config import load_config as load_config
from .core.events import TOPICS as TOPICS
from .core.events import Event as Event
from .core.events import EventRing as EventRing
from .core.events import Page as Page
from .core.identity import check_identity as check_identity
from .core.limiter import LeakyBucket as LeakyBucket
from .core.listen import ListenAddress as ListenAddress
from .core.listen import parse_listen as parse_listen
from .core.model import Accepted as Accepted
from .core.model import Admitter as Admitter
from .core.model import Problem as Problem
from .core.model import Report as Report
from .core.resources import ResourceState as ResourceState
from .core.resources import ResourceTable as ResourceTable
from .core.routing import HealthPolicy as HealthPolicy
from .core.routing import UpstreamRouter as UpstreamRouter
from .core.routing import rendezvous_score as rendezvous_score
from .core.umh import AckOutcome as AckOutcome
from .core.umh import DeadLetter as DeadLetter
from .core.umh import RetryPolicy as RetryPolicy
from .core.umh import UnconfirmedMessages as UnconfirmedMessages
from .relay import Relay as Relay
from .server import RelayServer as RelayServer
from .services.hub import EventHub as EventHub
from .services.hub import SubscriberLimit as SubscriberLimit
from .services.hub import Subscription as Subscription
from .services.scheduler import DeadlineScheduler as DeadlineScheduler
from .services.senders import SenderPool as SenderPool
from .services.sidequeue import SideQueue as SideQueue
from .stream.receiver import ReceiverLimits as ReceiverLimits
from .stream.receiver import StreamReceiver as StreamReceiver
from .upstreams.base import Outbound as Outbound
from .upstreams.base import Upstream as Upstream
from .upstreams.file import FileUpstream as FileUpstream
from .upstreams.http import HttpUpstream as HttpUpstream
