from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from email_service.authentication import ApiToken


class Command(BaseCommand):
    help = (
        "Make a new API token for USERNAME and print it as the last line. Only its SHA-256 is kept: "
        "the token cannot be shown again. It expires after API_TOKEN_TTL seconds unless --days says."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--days", type=int, help="Days the token is valid instead of API_TOKEN_TTL.")

    def handle(self, *args, username, days, **options):
        users = get_user_model()._default_manager
        try:
            user = users.get_by_natural_key(username)
        except users.model.DoesNotExist:
            raise CommandError(f"No user {username!r}.") from None
        if days is not None and days < 1:
            raise CommandError("--days must be at least 1.")
        token, key = ApiToken.objects.issue(user, ttl=None if days is None else timedelta(days=days))
        self.stdout.write(
            f"API token {token.prefix}… for {username}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC:"
        )
        self.stdout.write(key)
