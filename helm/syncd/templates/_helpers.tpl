{{- define "syncd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "syncd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "syncd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "syncd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "syncd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "syncd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "syncd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "syncd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "syncd.secretName" -}}
{{- default (include "syncd.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "syncd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The port of config.http.listen: the container's metrics/probe port. */}}
{{- define "syncd.port" -}}
{{- regexFind "[0-9]+$" .Values.config.http.listen }}
{{- end }}

{{- define "syncd.secretsDir" -}}/var/run/secrets/syncd{{- end }}

{{/* Refuse value combinations the schema cannot express. */}}
{{- define "syncd.validate" -}}
{{- if and (eq .Values.store.engine "sqlite") (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount=%d needs store.engine=postgresql: a SQLite store is per pod, so replicas would not share the budget or the jobs" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (eq .Values.store.engine "postgresql") (not .Values.secrets.existingSecret) (not .Values.secrets.storeUrl) }}
{{- fail "store.engine=postgresql needs secrets.storeUrl or secrets.existingSecret (key store-url)" }}
{{- end }}
{{- if and .Values.secrets.storeUrl (ne .Values.store.engine "postgresql") }}
{{- fail "secrets.storeUrl is set but store.engine is not postgresql" }}
{{- end }}
{{- if and .Values.store.postgresql.caSecret (ne .Values.store.engine "postgresql") }}
{{- fail "store.postgresql.caSecret is set but store.engine is not postgresql" }}
{{- end }}
{{- if and .Values.store.sqlite.existingClaim (or (ne .Values.store.engine "sqlite") (ne .Values.store.sqlite.volume "persistentVolumeClaim")) }}
{{- fail "store.sqlite.existingClaim is set but the store is not SQLite on a persistentVolumeClaim (store.engine=sqlite, store.sqlite.volume=persistentVolumeClaim)" }}
{{- end }}
{{- end }}

{{/* The broker ports of the NetworkPolicy, as a JSON list: networkPolicy.egress.kafka.ports, or
the ports of config.kafka.bootstrap_servers (Kafka's 9092 where one names none). */}}
{{- define "syncd.kafkaPorts" -}}
{{- $ports := .Values.networkPolicy.egress.kafka.ports }}
{{- if not $ports }}
{{- range splitList "," .Values.config.kafka.bootstrap_servers }}
{{- $port := regexFind ":[0-9]+$" (trim .) | trimPrefix ":" | default "9092" }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- end }}
{{- uniq $ports | toJson }}
{{- end }}

{{- define "syncd.pgCaDir" -}}/var/run/secrets/syncd-postgresql-ca{{- end }}

{{/* Environment of both containers: verified TLS to PostgreSQL (asyncpg reads PGSSLMODE and
PGSSLROOTCERT when the store URL names no ssl mode), then extraEnv. */}}
{{- define "syncd.env" -}}
{{- if and (eq .Values.store.engine "postgresql") .Values.store.postgresql.caSecret }}
- name: PGSSLMODE
  value: verify-full
- name: PGSSLROOTCERT
  value: {{ include "syncd.pgCaDir" . }}/ca.crt
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* One TOML value: string, boolean, number (integral numbers within 2^53, which float64
holds exactly, as integers; int64 would wrap larger ones) or list. */}}
{{- define "syncd.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "syncd.tomlValue" $v }}{{ end }}]
{{- else if and (eq (float64 .) (floor .)) (lt (float64 .) 9007199254740992.0) (gt (float64 .) -9007199254740992.0) }}{{ int64 . }}
{{- else }}{{ float64 . }}
{{- end }}
{{- end }}

{{/* config.toml: the values' config plus the keys the chart owns (store URL, secret files). */}}
{{- define "syncd.configToml" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $dir := include "syncd.secretsDir" . }}
{{- $_ := set $cfg.amazon "client_secret_file" (printf "%s/client-secret" $dir) }}
{{- $_ = set $cfg.amazon "refresh_token_file" (printf "%s/refresh-token" $dir) }}
{{- if eq .Values.store.engine "postgresql" }}
{{- $_ = set $cfg.store "url_file" (printf "%s/store-url" $dir) }}
{{- else }}
{{- $_ = set $cfg.store "url" "sqlite+aiosqlite:////var/lib/syncd/syncd.db" }}
{{- end }}
{{- if hasPrefix "SASL_" $cfg.kafka.security_protocol }}{{/* syncd authenticates ("" = PLAIN) */}}
{{- $_ = set $cfg.kafka "sasl_password_file" (printf "%s/kafka-sasl-password" $dir) }}
{{- end }}
# Rendered by the syncd Helm chart from .Values.config; secrets are read from files.
{{- range $section, $keys := omit $cfg "destinations" }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{ $key }} = {{ include "syncd.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $cfg.destinations }}

[[destinations]]
{{- range $key, $value := . }}
{{ $key }} = {{ include "syncd.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{- define "syncd.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "syncd.volumeMounts" -}}
- name: config
  mountPath: /etc/syncd
  readOnly: true
- name: secrets
  mountPath: {{ include "syncd.secretsDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/syncd
{{- if and (eq .Values.store.engine "postgresql") .Values.store.postgresql.caSecret }}
- name: postgresql-ca
  mountPath: {{ include "syncd.pgCaDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
