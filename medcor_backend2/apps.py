"""The admin app with the staff admin site (medcor_backend2/admin_site.py) as its default site.

Every process loads the admin's modules at setup (autodiscovery), as Django's AdminConfig does,
except Celery's: a worker or beat serves no admin page, and the admin's modules (with Django REST
framework and requests, which they import) were about 0.26 s of every worker's start. There they
load on first use instead: the root URLconf calls `discover()` before it builds the admin's URLs,
so a worker that links to the admin (the minimal support mail) finds every page registered.
"""

from django.contrib.admin.apps import AdminConfig, SimpleAdminConfig

# Set by medcor_backend2.celery in a Celery worker or beat, before Celery's Django fixup calls
# django.setup(); `discover()` then does what ready() would have.
_deferred = False
_discovered = False


def defer_discovery():
    """Leave the admin's autodiscovery to the first `discover()`; call before django.setup()."""
    global _deferred
    _deferred = True


def discover():
    """Load every app's admin module and the staff site's own admins, once per process."""
    global _discovered
    if _discovered:
        return
    from django.contrib import admin

    from .device_admin import register_device_admin

    admin.autodiscover()
    # After autodiscovery, which registered django-otp's own device admin.
    register_device_admin(admin.site)
    _discovered = True


class StaffAdminConfig(AdminConfig):
    default_site = "medcor_backend2.admin_site.StaffAdminSite"

    def ready(self):
        # The admin's checks, then what AdminConfig.ready() adds to them: the autodiscovery.
        SimpleAdminConfig.ready(self)
        if not _deferred:
            discover()
