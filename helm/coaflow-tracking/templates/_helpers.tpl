{{- define "coaflow-tracking.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-tracking.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "coaflow-tracking.labels" -}}
{{ include "coaflow-tracking.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: coaflow
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "coaflow-tracking.claim" -}}
{{- .Values.persistence.existingClaim | default (include "coaflow-tracking.fullname" .) -}}
{{- end -}}

{{/* The backend store URI; the password comes from $(PGPASSWORD), expanded by Kubernetes. */}}
{{- define "coaflow-tracking.backendUri" -}}
{{- if eq .Values.backend.type "postgresql" -}}
{{- with .Values.backend.postgresql -}}
postgresql://{{ .user }}:$(PGPASSWORD)@{{ required "backend.postgresql.host is required" .host }}:{{ .port }}/{{ .database }}
{{- end -}}
{{- else -}}
sqlite:////data/mlflow.db
{{- end -}}
{{- end -}}

{{- define "coaflow-tracking.artifactsUri" -}}
{{- if eq .Values.artifacts.type "s3" -}}
s3://{{ required "artifacts.s3.bucket is required" .Values.artifacts.s3.bucket }}/{{ .Values.artifacts.s3.prefix }}
{{- else -}}
/data/artifacts
{{- end -}}
{{- end -}}

{{- define "coaflow-tracking.needsVolume" -}}
{{- if or (eq .Values.backend.type "sqlite") (eq .Values.artifacts.type "local") -}}true{{- end -}}
{{- end -}}

{{- define "coaflow-tracking.allowedHosts" -}}
{{- $defaults := list "localhost*" "127.0.0.1*" "10.*" "172.*" "192.168.*" (printf "%s*" (include "coaflow-tracking.fullname" .)) -}}
{{- concat $defaults .Values.allowedHosts | join "," -}}
{{- end -}}

{{/* The install's values (helm/coaflow) share `global`; where it sets a value, it wins. */}}
{{- define "coaflow-tracking.image" -}}
{{- $g := dig "images" dict (.Values.global | default dict) -}}
{{- if $g.registry -}}
{{- printf "%s/coaflow-tracking:%s" (trimSuffix "/" $g.registry) (toString ($g.tag | default .Values.image.tag)) -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-tracking.checkNamespace" -}}
{{- with dig "namespace" "" (.Values.global | default dict) -}}
{{- if and $.Release.Namespace (ne . $.Release.Namespace) -}}
{{- fail (printf "global.namespace is %q but this release goes to namespace %q: install it with -n %s, or set global.namespace (the stage pods find MLflow at coaflow-tracking.<global.namespace>)" . $.Release.Namespace .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
