FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmagic1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# Throwaway keys: collectstatic loads the settings, which need keys outside debug; none is kept.
RUN DJANGO_SECRET_KEY=collectstatic-only AUDIT_HMAC_KEY=collectstatic-only \
    MEDCOR_ENCRYPTION_KEYS="$(python -c 'from medcor_backend2.keys import generate_key; print(generate_key())')" \
    MEDCOR_INDEX_KEY="$(python -c 'from medcor_backend2.keys import generate_key; print(generate_key())')" \
    python manage.py collectstatic --noinput \
    && python -m compileall -q email_service medcor_backend2 \
    && useradd --create-home --uid 1000 medcor \
    && mkdir -p /app/media /app/var && chown -R medcor /app/media /app/var
USER medcor

EXPOSE 8000
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "medcor_backend2.wsgi:application"]
