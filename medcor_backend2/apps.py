"""The admin app with the staff admin site (medcor_backend2/admin_site.py) as its default site."""

from django.contrib.admin.apps import AdminConfig


class StaffAdminConfig(AdminConfig):
    default_site = "medcor_backend2.admin_site.StaffAdminSite"

    def ready(self):
        super().ready()
        # After autodiscovery, which registered django-otp's own device admin.
        from .device_admin import register_device_admin

        register_device_admin(self.module.site)
