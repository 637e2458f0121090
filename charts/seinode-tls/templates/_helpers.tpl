{{/* The chart's name: nameOverride, or the chart's own. It is the app.kubernetes.io/name label. */}}
{{- define "seinode-tls.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of the release's objects: fullnameOverride, or <release>-<name> (just <release>
when it already contains the name). */}}
{{- define "seinode-tls.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "seinode-tls.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The labels of every object the chart renders: the standard ones, then commonLabels (which
never replace a standard one: the selectors rely on them). */}}
{{- define "seinode-tls.labels" -}}
{{- $labels := dict
  "app.kubernetes.io/name" (include "seinode-tls.name" .)
  "app.kubernetes.io/instance" .Release.Name
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/managed-by" .Release.Service
  "helm.sh/chart" (printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_")
-}}
{{- toYaml (merge $labels (.Values.commonLabels | default dict)) -}}
{{- end -}}

{{- define "seinode-tls.selectorLabels" -}}
app.kubernetes.io/name: {{ include "seinode-tls.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The labels of the pods: the selector's, then commonLabels and podLabels (neither replaces
a selector label). */}}
{{- define "seinode-tls.podLabels" -}}
{{- $labels := fromYaml (include "seinode-tls.selectorLabels" .) -}}
{{- toYaml (merge $labels (.Values.podLabels | default dict) (.Values.commonLabels | default dict)) -}}
{{- end -}}

{{/* The image: repository@digest when image.digest is set (the tag is then ignored), else
repository:tag (the chart's appVersion by default). */}}
{{- define "seinode-tls.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the pods run as and the RBAC binds: the chart's (serviceAccount.name, or
the full name), or with serviceAccount.create=false an existing one, which must be named. */}}
{{- define "seinode-tls.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "seinode-tls.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false: the existing ServiceAccount in the release namespace the pods run as (the chart binds its roles to it)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A security context from values, without the fields set to null or "" (so that an override
can drop a default, e.g. runAsUser on OpenShift, which assigns the UID itself). */}}
{{- define "seinode-tls.securityContext" -}}
{{- $context := dict -}}
{{- range $key, $value := . -}}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) -}}
{{- $_ := set $context $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{- define "seinode-tls.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-webhook-tls" (include "seinode-tls.fullname" .) -}}
{{- else -}}
{{- required "tls.secretName is required when tls.certManager.enabled is false" .Values.tls.secretName -}}
{{- end -}}
{{- end -}}

{{/* The Secret of the controller's client certificate for the node proxies (tls.crt, tls.key,
ca.crt): cert-manager's, or one the operator provides. */}}
{{- define "seinode-tls.sidecarClientSecretName" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-sidecar-client" (include "seinode-tls.fullname" .) -}}
{{- else -}}
{{- required "sidecarClient.secretName is required when tls.certManager.enabled is false: a kubernetes.io/tls Secret in the release namespace with the controller's client certificate (tls.crt, tls.key) and its CA (ca.crt), see docs/operations.md" .Values.sidecarClient.secretName -}}
{{- end -}}
{{- end -}}

{{/* The user the node proxies authenticate the controller's client certificate as (its CN). */}}
{{- define "seinode-tls.sidecarClientUser" -}}
{{- required "sidecarClient.user is required: the CommonName of the controller's client certificate, bound to the sidecar-client ClusterRole" .Values.sidecarClient.user -}}
{{- end -}}

{{/* What a caller of a node's sidecar task API needs: kube-rbac-proxy authorizes each request
with a SubjectAccessReview on the virtual resource seinodetasks (sei.io), named after the SeiNode
in its namespace, the verb from the method. Nothing in the API server serves seinodetasks: the
rule means something only to the node proxies. */}}
{{- define "seinode-tls.sidecarTaskRules" -}}
# POST (submit a task, e.g. mark-ready) is create, GET (read tasks) is get; list goes with get
# for the read side. resourceNames in a copy of this rule narrows it to single nodes.
- apiGroups: ["sei.io"]
  resources: ["seinodetasks"]
  verbs: ["create", "get", "list"]
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
    {{- with .Values.watchNamespaces }}
    # Only the watched namespaces: elsewhere this release neither sees the Secrets (a SeiNode
    # would be told its Secret does not exist yet) nor reconciles the nodes.
    - key: kubernetes.io/metadata.name
      operator: In
      values:
        {{- range . }}
        - {{ . }}
        {{- end }}
    {{- end }}
{{- end -}}

{{/* What the ServiceAccount may do where it watches: a ClusterRole's rules, or each watched
namespace's Role's (watchNamespaces). */}}
{{- define "seinode-tls.rules" -}}
# Webhook and controller caches; the controller writes only the status (a replace on the
# resourceVersion it decided from, so an older status never overwrites a newer one).
- apiGroups: ["sei.io"]
  resources: ["seinodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["sei.io"]
  resources: ["seinodes/status"]
  verbs: ["update"]
# TLS Secrets: the webhook's cache (list/watch), the controller's read (get) and watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# What the plans create and then server-side apply, and watch; get only when a create finds
# the name taken (to tell a lagging watch from an object in the way, which is never adopted).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The nodes' Pods (label app.kubernetes.io/managed-by=seinode-tls): the controller watches them
# and dials a node's sidecar at its Pod IP. Read only: the StatefulSets own the Pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events are created once each (named after what they report), never patched.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* watchNamespaces must be namespace names, each once (the binary refuses anything else). */}}
{{- define "seinode-tls.checkWatchNamespaces" -}}
{{- $seen := dict -}}
{{- range .Values.watchNamespaces -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" (toString .)) -}}
{{- fail (printf "watchNamespaces: %q is not a namespace name (a DNS-1123 label)" (toString .)) -}}
{{- end -}}
{{- if hasKey $seen (toString .) -}}
{{- fail (printf "watchNamespaces: %q is listed twice" (toString .)) -}}
{{- end -}}
{{- $_ := set $seen (toString .) true -}}
{{- end -}}
{{- end -}}
