"""Keep storage in step with the rows: a deleted request takes its attachment with it."""

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from .models import EmailRequest


@receiver(post_delete, sender=EmailRequest)
def delete_attachment_file(sender, instance, **kwargs):
    if instance.file_attached:
        name, storage = instance.file_attached.name, instance.file_attached.storage
        # Only once the delete is committed: a rolled-back delete keeps its file.
        transaction.on_commit(lambda: storage.delete(name))
