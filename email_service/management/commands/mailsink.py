import signal
import threading

from aiosmtpd.controller import Controller
from django.core.management.base import BaseCommand

from email_service import conf
from email_service.mailsink import MailboxHandler


class Command(BaseCommand):
    help = "Run a local SMTP server that stores every mail it receives as an .eml file."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=1025)
        parser.add_argument("--dir", default=str(conf.mailbox_dir()))

    def handle(self, *args, host, port, dir, **options):
        controller = Controller(
            MailboxHandler(dir), hostname=host, port=port, data_size_limit=64 * 1024 * 1024
        )
        controller.start()
        self.stdout.write(f"SMTP sink listening on {host}:{port}, saving mail to {dir}", ending="\n")
        self.stdout.flush()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            controller.stop()
