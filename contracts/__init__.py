"""Message and record models shared by transform-worker and the services that call it."""

from contracts.commands import CREATE_JOB, GET_JOB, CreateJob, GetJob
from contracts.errors import Error, ErrorFault, ErrorKey
from contracts.jobs import FINAL_STATUSES, Attachment, Event, Fault, Intent, Job, Status
from contracts.timestamps import Timestamp, format_timestamp, utc_now
from contracts.workflows import Next, Step, Workflow

__all__ = [
    "CREATE_JOB",
    "FINAL_STATUSES",
    "GET_JOB",
    "Attachment",
    "CreateJob",
    "Error",
    "ErrorFault",
    "ErrorKey",
    "Event",
    "Fault",
    "GetJob",
    "Intent",
    "Job",
    "Next",
    "Status",
    "Step",
    "Timestamp",
    "Workflow",
    "format_timestamp",
    "utc_now",
]
