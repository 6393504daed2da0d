{{/* Chart name, or nameOverride. */}}
{{- define "tokenmgr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless it contains it. */}}
{{- define "tokenmgr.fullname" -}}
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

{{/* The worker example's name. */}}
{{- define "tokenmgr.workerName" -}}
{{- printf "%s-worker" (include "tokenmgr.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "tokenmgr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tokenmgr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenmgr
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of a component (refresher or worker): pass (list . "refresher"). */}}
{{- define "tokenmgr.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "tokenmgr.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "tokenmgr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokenmgr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tokenmgr.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Appends "--name=value" to a list of arguments for each (list "name" value)
pair whose value is not empty (the binary's default then applies); whole
numbers print without an exponent. Pass (list $args pairs); the arguments
are returned as a YAML list, for fromYamlArray.
*/}}
{{- define "tokenmgr.flags" -}}
{{- $args := index . 0 }}
{{- range $f := index . 1 }}
{{- $v := index $f 1 }}
{{- if ne (toString $v) "" }}
{{- if and (kindIs "float64" $v) (eq $v (floor $v)) }}
{{- $v = int64 $v }}
{{- end }}
{{- $args = append $args (printf "--%s=%v" (index $f 0) $v) }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
Appends to a list of EnvVars one from a Secret item of .Values.secrets,
when the item has a key. Pass (list $ envVars "ENV_NAME" item); returns the
list as YAML, for fromYamlArray.
*/}}
{{- define "tokenmgr.secretEnv" -}}
{{- $ := index . 0 }}
{{- $env := index . 1 }}
{{- $item := index . 3 }}
{{- if $item.key }}
{{- $name := $item.name | default $.Values.secrets.name | default (include "tokenmgr.fullname" $) }}
{{- $env = append $env (dict "name" (index . 2) "valueFrom" (dict "secretKeyRef" (dict "name" $name "key" $item.key))) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/*
The environment both binaries share: Redis, client id and secret, keys.
The Redis password comes first, so that $(TOKENMGR_REDIS_PASSWORD) in the
URL expands. Pass (list $ clientID); returns YAML, for fromYamlArray.
*/}}
{{- define "tokenmgr.commonEnv" -}}
{{- $ := index . 0 }}
{{- $clientID := index . 1 }}
{{- $s := $.Values.secrets }}
{{- $env := include "tokenmgr.secretEnv" (list $ (list) "TOKENMGR_REDIS_PASSWORD" $s.redisPassword) | fromYamlArray }}
{{- if $s.redisURL.key }}
{{- $env = include "tokenmgr.secretEnv" (list $ $env "TOKENMGR_REDIS_URL" $s.redisURL) | fromYamlArray }}
{{- else }}
{{- $env = append $env (dict "name" "TOKENMGR_REDIS_URL" "value" (required "redis.url or secrets.redisURL is required" $.Values.redis.url)) }}
{{- end }}
{{- $env = append $env (dict "name" "TOKENMGR_LAYOUT" "value" (default "hash" $.Values.redis.layout)) }}
{{- if or $.Values.redis.ca.secretName $.Values.redis.ca.configMapName }}
{{- $env = append $env (dict "name" "TOKENMGR_REDIS_CA_FILE" "value" (printf "/etc/tokenmgr/redis-ca/%s" $.Values.redis.ca.key)) }}
{{- end }}
{{- if $clientID }}
{{- $env = append $env (dict "name" "TOKENMGR_CLIENT_ID" "value" $clientID) }}
{{- else }}
{{- $env = include "tokenmgr.secretEnv" (list $ $env "TOKENMGR_CLIENT_ID" $s.clientID) | fromYamlArray }}
{{- end }}
{{- $env = include "tokenmgr.secretEnv" (list $ $env "TOKENMGR_CLIENT_SECRET" $s.clientSecret) | fromYamlArray }}
{{- $env = include "tokenmgr.secretEnv" (list $ $env "TOKENMGR_ENCRYPTION_KEY" $s.encryptionKeys) | fromYamlArray }}
{{- toYaml $env }}
{{- end }}

{{/* The Redis CA volume, when one is configured. */}}
{{- define "tokenmgr.caVolume" -}}
{{- with .Values.redis.ca }}
{{- if and .secretName .configMapName }}
{{- fail "redis.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if .secretName }}
- name: redis-ca
  secret:
    secretName: {{ .secretName }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- else if .configMapName }}
- name: redis-ca
  configMap:
    name: {{ .configMapName }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tokenmgr.caMount" -}}
{{- if or .Values.redis.ca.secretName .Values.redis.ca.configMapName }}
- name: redis-ca
  mountPath: /etc/tokenmgr/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{/* Whether the admin listener takes connections from outside the pod. */}}
{{- define "tokenmgr.adminExposed" -}}
{{- if and .Values.admin.enabled .Values.admin.expose }}true{{ end }}
{{- end }}
