{{- define "coaflow-serving.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
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
  value: {{ .Values.mlflow.trackingUri | quote }}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
{{- end -}}
