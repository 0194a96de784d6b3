{{- define "coaflow-serving.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "coaflow-serving.labels" -}}
{{ include "coaflow-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: coaflow
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Environment both containers share: the model URI comes from the pod annotation that
`coaflow deploy` patches, so a rollout changes one value. */}}
{{- define "coaflow-serving.env" -}}
- name: MODEL_URI
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['coaflow.io/model-uri']
- name: MLFLOW_TRACKING_URI
  value: {{ include "coaflow-serving.trackingUri" . | quote }}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
{{- end -}}

{{/* The install's values (helm/coaflow) share `global`; where it sets a value, it wins. */}}
{{- define "coaflow-serving.image" -}}
{{- $g := dig "images" dict (.Values.global | default dict) -}}
{{- if $g.registry -}}
{{- printf "%s/coaflow-%s:%s" (trimSuffix "/" $g.registry) (.Values.gpu.enabled | ternary "gpu" "cpu") (toString ($g.tag | default .Chart.AppVersion)) -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-serving.pullPolicy" -}}
{{- dig "images" "pullPolicy" .Values.image.pullPolicy (.Values.global | default dict) -}}
{{- end -}}

{{/* The registered model it serves: models:/<global.modelName>@champion, else model.uri. */}}
{{- define "coaflow-serving.modelUri" -}}
{{- with dig "modelName" "" (.Values.global | default dict) -}}
{{- printf "models:/%s@champion" . -}}
{{- else -}}
{{- .Values.model.uri -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-serving.servedName" -}}
{{- dig "modelName" "" (.Values.global | default dict) | default .Values.model.servedName -}}
{{- end -}}

{{- define "coaflow-serving.trackingUri" -}}
{{- dig "trackingUri" "" (.Values.global | default dict) | default .Values.mlflow.trackingUri | default (printf "http://coaflow-tracking.%s:5000" .Release.Namespace) -}}
{{- end -}}

{{- define "coaflow-serving.checkNamespace" -}}
{{- with dig "namespace" "" (.Values.global | default dict) -}}
{{- if and $.Release.Namespace (ne . $.Release.Namespace) -}}
{{- fail (printf "global.namespace is %q but this release goes to namespace %q: install it with -n %s, or set global.namespace (deploy rolls out the serving Deployment of global.namespace)" . $.Release.Namespace .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
