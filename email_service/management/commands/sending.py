from django.core.management.base import BaseCommand

from email_service import brake, sending
from email_service.audit import AuditChannel


class Command(BaseCommand):
    help = (
        "The sender-wide brake shared by every worker: `status` prints running or paused (with the "
        "reason and until when), `pause` stops every worker sending, `resume` lets them send again."
    )

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["status", "pause", "resume"])
        parser.add_argument("--reason", default="", help="Why sending is paused (for `pause`).")

    def handle(self, *args, action, reason, **options):
        if action == "pause":
            state = sending.pause_sending(reason, channel=AuditChannel.COMMAND)
        elif action == "resume":
            state = sending.resume_sending(channel=AuditChannel.COMMAND)
        else:
            state = brake.current(refresh=True)
        self.stdout.write(status_line(state))


def status_line(state):
    """Say `running`, or `paused`, why and until when, on one line."""
    info = brake.describe(state)
    if info["sending"] == "running":
        return "running"
    until = info["sending_paused_until"] or "an operator resumes sending"
    return f"paused: {info['sending_paused_reason']} (until {until})"
