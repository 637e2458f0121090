{{- define "seinode-tls.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "seinode-tls.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "seinode-tls.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "seinode-tls.serviceAccountName" -}}
{{- default (include "seinode-tls.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "seinode-tls.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-webhook-tls" (include "seinode-tls.fullname" .) -}}
{{- else -}}
{{- required "tls.secretName is required when tls.certManager.enabled is false" .Values.tls.secretName -}}
{{- end -}}
{{- end -}}

{{/* Annotations and caBundle shared by the webhook configurations. */}}
{{- define "seinode-tls.webhookAnnotations" -}}
{{- if .Values.tls.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "seinode-tls.fullname" .) }}
{{- end }}
{{- end -}}

{{- define "seinode-tls.clientConfig" -}}
clientConfig:
  service:
    namespace: {{ .root.Release.Namespace }}
    name: {{ include "seinode-tls.fullname" .root }}
    port: {{ .root.Values.webhook.port }}
    path: {{ .path }}
  {{- if not .root.Values.tls.certManager.enabled }}
  caBundle: {{ required "tls.caBundle is required when tls.certManager.enabled is false" .root.Values.tls.caBundle | b64enc }}
  {{- end }}
{{- end -}}

{{- define "seinode-tls.namespaceSelector" -}}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        - kube-system
        - {{ .Release.Namespace }}
        {{- range .Values.webhook.excludedNamespaces }}
        - {{ . }}
        {{- end }}
{{- end -}}
