"""manage.py of the peer projects: DJANGO_SETTINGS_MODULE names post_office_site or mailer_site."""

import sys

from django.core.management import execute_from_command_line

if __name__ == "__main__":
    execute_from_command_line(sys.argv)
