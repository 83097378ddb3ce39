#!/bin/sh
# Run by the secrets-check service, whose environment holds the secrets of infra/.env: exits 1, naming them,
# while any still holds a change-me placeholder of .env.example (unset or empty ones docker compose refuses).
placeholders=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*/\1/p' | sort | tr '\n' ' ')
if [ -n "$placeholders" ]; then
    echo "infra/.env still holds the change-me placeholder of .env.example in: ${placeholders% }." \
         "The stack does not start with passwords anyone can read in the repository: give each its own secret," \
         "e.g. python -c \"import secrets; print(secrets.token_urlsafe(24))\" (PREFECT_API_AUTH_STRING is" \
         "user:secret), then run docker compose up -d again." >&2
    exit 1
fi
echo "infra/.env: no change-me placeholder left"
